"""Load SD 1.x/2.x and SDXL pipelines into one `Components` object; LoRA; the reference model.

Everything that differs between SD and SDXL lives here, behind two methods:
`conditioning` (one text encoder's last hidden state, or SDXL's two penultimate hidden states
concatenated plus the pooled embedding and each image's size/crop time ids) and `encode_images`.
The training loop never asks which family it is training. Their maths are the module functions
`build_conditioning` and `sample_latents`, which the pre-encoding cache (cache.py) calls on stored
encodings, so the cached and the on-the-fly paths share one formula each.

Components are loaded one by one (not through `DiffusionPipeline`) so that only what training
needs is in memory, by the class names that `model_index.json` declares, restricted to the
diffusers and transformers libraries: a checkpoint can never name code to run.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from diffusion_dpo.config import LoraConfig, ModelConfig
from diffusion_dpo.errors import UserError, is_local_path


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for [winners; losers] (2B latents)."""

    hidden_states: Tensor  # (2B, L, D) text encoder hidden states
    added: Optional[dict[str, Tensor]] = None  # SDXL: text_embeds (2B, P), time_ids (2B, 6)


@dataclass(frozen=True)
class LatentScale:
    """How VAE posterior samples become the UNet's latents: (sample - shift) * scaling (the VAE config's)."""

    scaling_factor: float
    shift_factor: float = 0.0

    @classmethod
    def of(cls, vae_config: Any) -> "LatentScale":
        return cls(float(vae_config["scaling_factor"]), float(vae_config.get("shift_factor", None) or 0.0))


def sample_latents(mean: Tensor, std: Tensor, eps: Optional[Tensor], scale: LatentScale) -> Tensor:
    """Scaled latents from the VAE posterior N(mean, std²): (mean + std * eps - shift) * scaling, or the mean
    when eps is None. The one formula for encoding on the fly and for the pre-encoded cache."""
    latents = mean if eps is None else mean + std * eps.to(mean)
    return (latents - scale.shift_factor) * scale.scaling_factor


def build_conditioning(hidden: Tensor, pooled: Optional[Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                       resolution: int) -> Conditioning:
    """Conditioning for [winners; losers] from the B prompts' encodings: both images of a pair share the
    prompt; for SDXL (pooled given) each image gets its own original size and crop offsets as time ids.

    hidden (B, L, D), pooled (B, P) or None; original_sizes, crop_top_lefts: (B, 2, 2) as (pair, image,
    (h|top, w|left)). time_ids = (orig_h, orig_w, top, left, target_h, target_w).
    """
    hidden = hidden.repeat(2, 1, 1)  # (2B, L, D)
    if pooled is None:
        return Conditioning(hidden)
    sizes = torch.cat([original_sizes[:, 0], original_sizes[:, 1]])  # (2B, 2), winners first
    crops = torch.cat([crop_top_lefts[:, 0], crop_top_lefts[:, 1]])
    target = torch.tensor([resolution, resolution]).expand(sizes.shape[0], 2)
    # built on the host from the batch, copied without waiting for the device (no sync in the step)
    time_ids = torch.cat([sizes.cpu(), crops.cpu(), target], dim=1).to(pooled.device, pooled.dtype, non_blocking=True)
    return Conditioning(hidden, {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids})


def denoising_mse(unet: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning, target: Tensor) -> Tensor:
    """(N,) per-sample MSE (mean over C, H, W) of the UNet's prediction against `target`: the quantity every
    loss sees, for the policy, the live reference and the precomputed reference alike."""
    pred = unet(noisy, timesteps, cond.hidden_states, added_cond_kwargs=cond.added).sample
    return (pred.float() - target).pow(2).mean(dim=(1, 2, 3))


@dataclass
class Components:
    """The parts of a text-to-image pipeline that training needs, with the family's conventions.

    Training from a pre-encoded cache loads neither the VAE nor the text encoders (`vae` is None,
    `text_encoders` empty); only the VAE's config (latent geometry and scale) is read.
    """

    pretrained: str
    unet: Optional[nn.Module]
    vae: Optional[nn.Module]
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any  # a DDPMScheduler with the checkpoint's betas and prediction type
    pipeline_class: type
    sdxl: bool
    vae_config: Any = None  # the VAE's config (always present; read from disk when the VAE is not loaded)

    @property
    def latent_scale(self) -> LatentScale:
        return LatentScale.of(self.vae_config)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @torch.no_grad()
    def encode_prompt(self, input_ids: list[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids (one (B, L) tensor per tokenizer) -> hidden states (B, L, D) and, for SDXL, pooled (B, P)."""
        if not self.sdxl:
            (ids,) = input_ids
            return self.text_encoders[0](ids.to(self.text_encoders[0].device))[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, input_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]  # the last encoder (with projection) gives the pooled text embedding
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, input_ids: list[Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> Conditioning:
        """Conditioning for [winners; losers]: both images of a pair share the prompt; for SDXL each
        image gets its own original size and crop offsets as time ids.

        input_ids: one (B, L) tensor per tokenizer; original_sizes, crop_top_lefts: (B, 2, 2) as
        (pair, image, (h|top, w|left)). time_ids = (orig_h, orig_w, top, left, target_h, target_w).
        """
        hidden, pooled = self.encode_prompt(input_ids)
        return build_conditioning(hidden, pooled if self.sdxl else None, original_sizes, crop_top_lefts, resolution)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a resolution x resolution image."""
        factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        return self.vae_config["latent_channels"], resolution // factor, resolution // factor

    @torch.no_grad()
    def posterior(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std, each (N, C, H/f, W/f)."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixel_values.to(self.vae.device, vae_dtype)).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f): a posterior sample
        mean + std * noise (standard normal, (N, C, h, w)), or the mean when noise is None."""
        return sample_latents(*self.posterior(pixel_values), noise, self.latent_scale)

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """The forward-diffused latents x_t and the regression target (fp32), for training and the reference pass."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps), self.target(latents, noise, timesteps).float()

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target: ε for epsilon-prediction, v for v-prediction (from the scheduler config)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise UserError(f"{self.pretrained}: unsupported prediction_type '{self.prediction_type}' "
                        "(epsilon or v_prediction)")


def read_model_index(cfg: ModelConfig, setting: str = "model.pretrained") -> dict:
    """model_index.json of a local directory or hub repo, checked: one-line errors (naming `setting`, the
    option the user gave) for the usual mistakes, and only diffusers/transformers components."""
    from diffusers import DiffusionPipeline

    name = f"{setting} '{cfg.pretrained}'"
    path = Path(cfg.pretrained).expanduser()
    if path.exists():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"{name} is not a diffusers pipeline directory (no model_index.json)")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{index_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        needed = ["unet", "scheduler", "text_encoder", "tokenizer"] + (["vae"] if cfg.vae is None else [])
        needed += [n for n in ("text_encoder_2", "tokenizer_2") if (index.get(n) or [None])[0] is not None]
        missing = [n for n in needed if index.get(n) and not (path / n).is_dir()]
        if missing:
            raise UserError(f"{name}: missing component folder(s) {', '.join(n + '/' for n in missing)}")
    elif is_local_path(cfg.pretrained):
        raise UserError(f"{name} does not exist")
    else:
        try:
            index = DiffusionPipeline.load_config(cfg.pretrained, revision=cfg.revision)
        except Exception as exc:  # network, auth or not-found errors from the hub client
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{name} is not a local directory and could not be loaded from the hub: "
                            f"{reason}") from None
    # A checkpoint names the classes to build; only the two libraries' own may be named (no code enters).
    for key, entry in index.items():
        if not key.startswith("_") and isinstance(entry, list) and entry and \
                entry[0] not in (None, "diffusers", "transformers"):
            raise UserError(f"{name}: component {key} comes from '{entry[0]}'; only diffusers and transformers "
                            "components are loaded")
    return index


def _library_class(entry: list, what: str) -> type:
    """The class a model_index entry names, only from diffusers or transformers."""
    import diffusers
    import transformers

    library, name = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None or not hasattr(module, name):
        raise UserError(f"model_index.json: {what} is {library}.{name}; only diffusers/transformers classes load")
    return getattr(module, name)


def load_components(cfg: ModelConfig, weight_dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", unet: bool = True, encoders: bool = True) -> Components:
    """Load UNet (fp32, trainable), VAE and text encoders (frozen, `weight_dtype`), tokenizers and a DDPM
    noise scheduler from `cfg.pretrained` (plus `cfg.vae` if given).

    `unet=False` skips the UNet (the cache builder); `encoders=False` skips the VAE and text encoders,
    reading only the VAE's config (training from a pre-encoded cache)."""
    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel

    index = read_model_index(cfg)
    sdxl = "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None
    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_class is None or not index.get("unet") or not index.get("vae"):
        raise UserError(f"model.pretrained '{cfg.pretrained}': model_index.json does not describe a Stable "
                        "Diffusion (1.x/2.x/XL) pipeline with a UNet and a VAE")
    common = dict(revision=cfg.revision)
    try:
        scheduler = DDPMScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler", **common)
        if cfg.prediction_type is not None:
            scheduler.register_to_config(prediction_type=cfg.prediction_type)
        names = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
        tokenizers = [_library_class(index[n], n).from_pretrained(cfg.pretrained, subfolder=n, **common)
                      for n in names]
        text_encoders = [_library_class(index[n], n).from_pretrained(cfg.pretrained, subfolder=n,
                                                                      variant=cfg.variant, torch_dtype=weight_dtype,
                                                                      **common)
                         for n in (["text_encoder", "text_encoder_2"] if sdxl and encoders else
                                   ["text_encoder"] if encoders else [])]
        model = UNet2DConditionModel.from_pretrained(cfg.pretrained, subfolder="unet", variant=cfg.variant,
                                                     torch_dtype=torch.float32, **common) if unet else None
        vae = load_vae(cfg) if encoders else None
        config = vae.config if vae is not None else load_vae_config(cfg)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"model.pretrained '{cfg.pretrained}': {str(exc).strip().splitlines()[0]}") from None
    if vae is not None:
        # SDXL's original VAE overflows in fp16 (its config says force_upcast): keep it fp32 then.
        vae_dtype = torch.float32 if (weight_dtype == torch.float16 and vae.config.get("force_upcast", False)) \
            else weight_dtype
        cast(vae, vae_dtype)
    for module in [m for m in (vae, *text_encoders) if m is not None]:
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    if model is not None:
        model.to(device)
    return Components(pretrained=cfg.pretrained, unet=model, vae=vae, text_encoders=text_encoders,
                      tokenizers=tokenizers, noise_scheduler=scheduler, pipeline_class=pipeline_class, sdxl=sdxl,
                      vae_config=config)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts (and the autocast dtype) for train.mixed_precision no/fp16/bf16."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` only when it changes something (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def vae_location(cfg: ModelConfig) -> tuple[str | Path, dict]:
    """Where the VAE lives: (path or hub id, from_pretrained keyword arguments). The pipeline's vae/ folder,
    or `cfg.vae`: a VAE repo/dir (config at its root) or a pipeline with a vae/ folder."""
    if cfg.vae is None:
        return cfg.pretrained, dict(subfolder="vae", revision=cfg.revision)
    local = Path(cfg.vae).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return local, {}
        if (local / "vae" / "config.json").is_file():
            return local, dict(subfolder="vae")
        raise UserError(f"model.vae '{cfg.vae}' holds no VAE (no config.json, no vae/config.json)")
    if is_local_path(cfg.vae):
        raise UserError(f"model.vae '{cfg.vae}' does not exist")
    return cfg.vae, {}


def _vae_call(cfg: ModelConfig, fn: Any) -> Any:
    """`fn(where, **kwargs)` at the VAE's location; a separate hub VAE that fails is one line naming model.vae."""
    where, kwargs = vae_location(cfg)
    if cfg.vae is None or isinstance(where, Path):
        return fn(where, **kwargs)
    try:
        return fn(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.vae '{cfg.vae}' is not a local directory and could not be loaded from the hub: "
                        f"{str(exc).strip().splitlines()[0]}") from None


def load_vae(cfg: ModelConfig) -> nn.Module:
    """The pipeline's VAE, or `cfg.vae` (see `vae_location`)."""
    from diffusers import AutoencoderKL

    variant = dict(variant=cfg.variant) if cfg.vae is None else {}
    return _vae_call(cfg, lambda where, **kw: AutoencoderKL.from_pretrained(where, **kw, **variant))


def load_vae_config(cfg: ModelConfig) -> Any:
    """The VAE's config only (latent channels, downsampling, scaling and shift factors); no weights are read."""
    from diffusers import AutoencoderKL

    return _vae_call(cfg, AutoencoderKL.load_config)


def add_lora(unet: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
    """Freeze the UNet and attach a peft LoRA adapter to `cfg.target_modules`; return the trainable params.

    LoRA's B matrices start at zero, so the adapted UNet equals the base at step 0 (loss = log 2).
    """
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                              target_modules=list(cfg.target_modules))
    try:
        unet.add_adapter(peft_cfg)
    except ValueError as exc:
        raise UserError(f"lora.target_modules {list(cfg.target_modules)}: {str(exc).splitlines()[0]}") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the base is fp16/bf16
    return params


class Reference:
    """The frozen reference model: a separate frozen copy (full fine-tune) or the same UNet with its
    LoRA adapters disabled (no second copy in memory)."""

    def __init__(self, policy: nn.Module, lora: bool, dtype: torch.dtype):
        self.policy = policy
        self.lora = lora
        self.copy: Optional[nn.Module] = None
        if not lora:
            self.copy = cast(copy.deepcopy(policy).requires_grad_(False).eval(), dtype)

    @contextlib.contextmanager
    def model(self, policy: Optional[nn.Module] = None) -> Iterator[nn.Module]:
        """`with reference.model(unwrapped) as ref: ref(...)` under no_grad; restores adapters afterwards."""
        unet = policy if policy is not None else self.policy
        if self.copy is not None:
            # Same mode as the policy: some diffusers blocks take another (numerically different) path in
            # train mode (ResnetBlock2D's .contiguous()); then θ = ref would not give exactly log 2.
            # SD UNets have no dropout, so train mode keeps the reference deterministic.
            self.copy.train(unet.training)
            yield self.copy
            return
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()


def lora_state_dict(unet: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The adapter's weights in diffusers' naming and its peft config (saved as metadata so alpha survives)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, unet.peft_config["default"].to_dict()


def save_lora(components: Components, unet: nn.Module, out_dir: Path) -> None:
    """Write `pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights(out_dir)` loads."""
    weights, metadata = lora_state_dict(unet)
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    components.pipeline_class.save_lora_weights(out_dir, unet_lora_layers=weights,
                                                unet_lora_adapter_metadata=metadata, safe_serialization=True)


def build_pipeline(components: Components, unet: nn.Module, scheduler: Any = None) -> Any:
    """A diffusers pipeline around `unet` and the frozen parts (for sampling and for saving final/)."""
    from diffusers import SchedulerMixin

    if scheduler is None:
        config = dict(components.noise_scheduler.config)
        scheduler = components.noise_scheduler
        original = _original_scheduler_class(components.pretrained)
        if original is not None and issubclass(original, SchedulerMixin):
            scheduler = original.from_config(config)
    parts = dict(vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                 unet=unet, scheduler=scheduler)
    if components.sdxl:
        parts.update(text_encoder_2=components.text_encoders[1], tokenizer_2=components.tokenizers[1])
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return components.pipeline_class(**parts)


def _original_scheduler_class(pretrained: str) -> Optional[type]:
    """The sampling scheduler class the checkpoint ships with (e.g. PNDM for SD1.5, Euler for SDXL)."""
    import diffusers

    try:
        config = diffusers.DDPMScheduler.load_config(pretrained, subfolder="scheduler")
    except Exception:
        return None
    return getattr(diffusers, config.get("_class_name", ""), None)
