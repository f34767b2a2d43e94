"""The model-family contract: everything that differs between text-to-image families, behind one class.

The training loop, the pre-encoding cache, the precomputed reference, sample grids, `generate` and `bench` hold
a `Family` (one loaded checkpoint, from `models.load_components`) and call only what is below; none of them asks
which family it runs. A family is one module (models/sd.py, sd3.py, flux.py) with its subclass, listed once in
`models.loading.FAMILIES`.

What a family owns, in the order a training step uses it:

  text      `tokenizer`: prompts -> token ids {"input_ids", "input_ids_2", ...} (picklable: it runs in the
            DataLoader workers); `encode_prompt(ids)`: the per-prompt encodings the cache stores
            ({"hidden", "pooled", "t5", ...}); `conditioning(encodings, original_sizes, crop_top_lefts,
            resolution)`: what the denoiser sees for the 2B images [winners; losers], both images of a pair
            sharing its prompt.
  images    `posterior_shape(resolution)` (the VAE's), `latent_shape(resolution)` (the denoiser's),
            `posterior(pixels)`, `encode_images(pixels, eps)` (`vae.sample_latents` with `latent_scale`).
  schedule  `draw_timestep(generator, latent_shape, device)`: one pair's timestep (DDPM: an integer t; flow
            matching: sigma in (0, 1)) from the pair's own generator (`randomness.pair_noise`);
            `noisy_and_target(latents, noise, t)`; `loss_weight(t)` (None: unweighted).
  denoiser  `predict(model, noisy, t, cond)`: the prediction in the latents' (N, C, h, w) layout, so `mse`, the
            per-sample error every loss sees, is one formula for all families: the mean over all latent
            elements, times the family's loss weight.
  outputs   `build_pipeline(denoiser)` (sample grids), `save_lora(denoiser, dir)` (the file the family pipeline's
            `load_lora_weights` reads), `save_pipeline(denoiser, dir)` (final/ of a full fine-tune),
            `sampling_kwargs()` (pipeline-call arguments that the training settings imply).
  identity  class methods answering from model_index.json and the config before any weight loads: the text
            roles, what a cache's encodings depend on (`encoder_roles`, `encoding_identity`), and what reference
            errors depend on (`schedule_identity`).
  generate  class methods on a loaded diffusers pipeline: `latent_channels`, `native_size`, `size_multiple`,
            `pipeline_latents(noise)` (how (B, C, h, w) noise is handed to the pipeline as `latents=`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffusion_dpo.config import FlowConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.components import load_pipeline_class, restore_processor_folders
from diffusion_dpo.models.lora import lora_state_dict
from diffusion_dpo.models.vae import (FLUX2_STATISTICS, LatentScale, downsampling, latent_channels, load_vae,
                                      sample_latents, vae_posterior, vae_statistics)


VAE_BATCH = 8  # images per VAE encode call (diffusers' SDXL DPO script's vae_encode_batch_size)


def ids_key(k: int) -> str:
    """The batch key of the k-th tokenizer's ids: input_ids, input_ids_2, input_ids_3."""
    return "input_ids" if k == 0 else f"input_ids_{k + 1}"


@dataclass(frozen=True)
class PromptTokenizer:
    """Prompts -> one (N, L_k) tensor of token ids per tokenizer, padded to that tokenizer's length L_k (CLIP:
    its model_max_length, 77 for the real ones; T5: the family's max_sequence_length), as the pipelines pad."""

    tokenizers: tuple[Any, ...]
    lengths: tuple[int, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """The batch keys this tokenizer's output fills (what the training step hands `encode_prompt`)."""
        return tuple(ids_key(k) for k in range(len(self.tokenizers)))

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        return {ids_key(k): tok(list(prompts), padding="max_length", max_length=n, truncation=True,
                                return_tensors="pt").input_ids
                for k, (tok, n) in enumerate(zip(self.tokenizers, self.lengths))}


# model.* settings that only some families read; every other model.* setting is every family's
FAMILY_SETTINGS = ("prediction_type", "sdxl_time_ids", "t5", "max_sequence_length", "guidance")


class Family:
    """One loaded checkpoint of a family. Training from a pre-encoded cache loads neither the VAE nor the text
    encoders (`vae` None, `text_encoders` empty); the cache builder loads no denoiser. Configs are always read."""

    name: ClassVar[str]  # "sd", "sdxl", "sd3", "flux": in cache manifests and messages
    title: ClassVar[str]  # for messages, e.g. "Stable Diffusion 3 / 3.5"
    pipelines: ClassVar[tuple[str, ...]]  # the model_index.json `_class_name`s this family loads
    denoiser_role: ClassVar[str]  # "unet" or "transformer": its folder and its pipeline keyword
    default_lora_targets: ClassVar[tuple[str, ...]]
    lora_diffusers_naming: ClassVar[bool] = False  # save LoRA in diffusers' older naming (see lora.lora_state_dict)
    size_conditioning: ClassVar[bool] = False  # conditions on each image's size and crop (SDXL's time ids)
    card_tags: ClassVar[tuple[str, ...]] = ()  # the family's model-card tags, as diffusers' training scripts write
    # the model.* settings of FAMILY_SETTINGS this family reads (and checks): one set for a family that would ignore
    # it is refused before any work (models.loading.describe)
    settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ModelConfig, flow: FlowConfig, index: dict, pipeline_class: type,
                 denoiser: Optional[nn.Module], denoiser_config: Any, vae: Optional[nn.Module], vae_config: Any,
                 text_encoders: list[nn.Module], tokenizers: list[Any], scheduler: Any):
        self.cfg, self.flow, self.index = cfg, flow, index
        self.pretrained = cfg.pretrained
        self.pipeline_class = pipeline_class
        self.denoiser, self.denoiser_config = denoiser, denoiser_config
        self.vae, self.vae_config = vae, vae_config
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.scheduler = scheduler  # the training schedule (DDPM with the checkpoint's betas, or flow matching)
        self.roles = self.text_roles(index, cfg)
        self.tokenizer = PromptTokenizer(tuple(tokenizers), tuple(self.token_lengths()))

    # ------------------------------------------------------------------ identity (before any weight loads)
    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(text encoder, tokenizer) folder names, in the order their ids and encodings are used."""
        raise NotImplementedError

    @classmethod
    def check_index(cls, index: dict, cfg: ModelConfig, name: str) -> None:
        """Refuse, in one line naming `name`, a checkpoint or setting this family cannot train."""

    @classmethod
    def encoder_roles(cls, index: dict, cfg: ModelConfig) -> tuple[str, ...]:
        """The folders a cache's encodings depend on: the VAE, the text encoders and their tokenizers."""
        roles = cls.text_roles(index, cfg)
        return ("vae",) + tuple(e for e, _ in roles) + tuple(t for _, t in roles)

    @classmethod
    def encoding_identity(cls, cfg: ModelConfig) -> dict[str, Any]:
        """Settings besides the weights that change the cached text encodings."""
        return {}

    @classmethod
    def schedule_identity(cls, cfg: ModelConfig, flow: FlowConfig) -> dict[str, Any]:
        """Settings besides the weights that change a pair's timestep, target or error (the precomputed reference)."""
        raise NotImplementedError

    @classmethod
    def load_scheduler(cls, cfg: ModelConfig) -> Any:
        """The training noise schedule from the checkpoint's scheduler/ folder."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def token_lengths(self) -> list[int]:
        """Each tokenizer's padded length (default: its model_max_length)."""
        return [tok.model_max_length for tok in self.tokenizers]

    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """Token ids (the tokenizer's dict, B prompts) -> the per-prompt encodings, each (B, ...)."""
        raise NotImplementedError

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> Any:
        """The denoiser's conditioning for [winners; losers] (2B) from the B prompts' encodings; original_sizes and
        crop_top_lefts are (B, G, 2) as (item, image, (h|top, w|left)) (only SDXL reads their values), G = 2 images
        per pair or 1 per unpaired item (then the conditioning is for B images)."""
        raise NotImplementedError

    @staticmethod
    def images_per_item(original_sizes: Optional[Tensor]) -> int:
        """G of a batch's (B, G, 2) original_sizes: 2 images per pair, 1 per unpaired item (None: pairs)."""
        return 2 if original_sizes is None else original_sizes.shape[1]

    # ------------------------------------------------------------------ images
    @property
    def latent_scale(self) -> LatentScale:
        """How the VAE's posterior samples become the denoiser's latents (`vae.LatentScale`); FLUX.2's needs the
        VAE's BatchNorm statistics, read from the loaded VAE or, training from a cache, from its weights file."""
        if self.vae_config.get("batch_norm_eps") is None:  # from the config alone: cheap
            return LatentScale.of(self.vae_config)
        if getattr(self, "_stats_scale", None) is None:  # FLUX.2's statistics: read (or moved off the GPU) once
            self._stats_scale = LatentScale.of(self.vae_config, self._vae_statistics)
        return self._stats_scale

    def _vae_statistics(self) -> dict[str, Tensor]:
        if self.vae is not None:
            return {name: self.vae.get_buffer(name) for name in FLUX2_STATISTICS}
        if getattr(self, "_statistics", None) is None:  # read once from the weights file
            self._statistics = vae_statistics(self.cfg)
        return self._statistics

    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this (a transformer's patch size; FLUX's 2x2 packing)."""
        return 1

    def posterior_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) of the VAE posterior of a resolution x resolution image (the cache stores it; before
        FLUX.2's patchify, the same as `latent_shape` for every other family)."""
        side = resolution // downsampling(self.vae_config)
        return latent_channels(self.vae_config), side, side

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a resolution x resolution image; a resolution the denoiser cannot take is
        a one-line error."""
        f, p = downsampling(self.vae_config), self.latent_scale.patch
        side, multiple = resolution // f // p, self.latent_multiple()
        if resolution % (f * p) or side % multiple:
            raise UserError(f"data.resolution {resolution}: {self.title} needs a multiple of {f * p * multiple} "
                            f"(VAE downsampling {f} x {p * multiple})")
        return latent_channels(self.vae_config) * p * p, side, side

    @torch.no_grad()
    def posterior(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std, each (N, C, H/f, W/f), encoded
        VAE_BATCH images at a time: the fp32 VAE's activations at 1024 px are ~0.5 GB per image."""
        return vae_posterior(self.vae, pixel_values, VAE_BATCH)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> the denoiser's latents (N, `latent_shape`): a posterior sample
        mean + std * noise (standard normal, (N, `posterior_shape`)), or the mean when noise is None, scaled."""
        return sample_latents(*self.posterior(pixel_values), noise, self.latent_scale)

    # ------------------------------------------------------------------ schedule
    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, int, int],
                      device: torch.device | str) -> Tensor:
        """(1,) one pair's timestep, drawn from `generator` (the pair's own)."""
        raise NotImplementedError

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """The noised latents x_t and the regression target (fp32), for training and the reference pass."""
        raise NotImplementedError

    def loss_weight(self, timesteps: Tensor) -> Optional[Tensor]:
        """(N,) per-sample weights on the error, or None (unweighted)."""
        return None

    # ------------------------------------------------------------------ denoiser
    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        """The denoiser's prediction for `noisy` (N, C, h, w), in the same layout."""
        raise NotImplementedError

    def first_images(self, cond: Any, n: int) -> Any:
        """The conditioning of the first n images of a batch (the winners of [winners; losers]): every tensor of a
        family's conditioning is batch-first, so each is cut to its first n rows (None stays None)."""
        if isinstance(cond, (Tensor, list)):  # a list: one tensor per image (Z-Image's text tokens)
            return cond[:n]
        if isinstance(cond, dict):
            return {k: self.first_images(v, n) for k, v in cond.items()}
        if dataclasses.is_dataclass(cond):
            return dataclasses.replace(cond, **{f.name: self.first_images(getattr(cond, f.name), n)
                                                for f in dataclasses.fields(cond)})
        return cond

    def mse(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Any, target: Tensor) -> Tensor:
        """(N,) per-sample error: mean over all latent elements of (prediction - target)², times the loss weight.
        The quantity every loss sees, for the policy, the live reference and the precomputed reference alike."""
        return self.error(self.residual(model, noisy, timesteps, cond, target), timesteps)

    def residual(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Any, target: Tensor) -> Tensor:
        """(N, C, h, w) fp32 prediction - target (what the winner safeguard needs besides the errors)."""
        return self.predict(model, noisy, timesteps, cond).float() - target

    def error(self, residual: Tensor, timesteps: Tensor) -> Tensor:
        """(N,) the per-sample error of a residual: mean of its squares times the loss weight (see `mse`)."""
        err = residual.pow(2).flatten(1).mean(1)
        weight = self.loss_weight(timesteps)
        return err if weight is None else err * weight

    # ------------------------------------------------------------------ outputs
    def unused_parameters(self) -> tuple[str, ...]:
        """Name prefixes of the denoiser's parameters that never reach its output, so never get a gradient: training
        freezes them (`training.setup.trainable_parameters`), since DDP waits for every trainable parameter's
        gradient and fails at the second step without it. None in most families."""
        return ()

    def sampling_scheduler(self) -> Any:
        """A fresh sampling scheduler (the checkpoint's own class and config)."""
        raise NotImplementedError

    def extra_parts(self) -> dict[str, Any]:
        """Pipeline constructor arguments besides the VAE, text encoders, tokenizers, denoiser and scheduler."""
        return {}

    def build_pipeline(self, denoiser: nn.Module, scheduler: Any = None) -> Any:
        """A diffusers pipeline around `denoiser` and the loaded frozen parts (sample grids)."""
        parts: dict[str, Any] = {"vae": self.vae, self.denoiser_role: denoiser,
                                 "scheduler": scheduler if scheduler is not None else self.sampling_scheduler()}
        for (encoder_role, tokenizer_role), encoder, tokenizer in zip(self.roles, self.text_encoders,
                                                                      self.tokenizers):
            parts[encoder_role], parts[tokenizer_role] = encoder, tokenizer
        return self.pipeline_class(**parts, **self.extra_parts())

    def sampling_kwargs(self) -> dict[str, Any]:
        """Pipeline-call arguments implied by the training settings (e.g. the T5 length)."""
        return {}

    def save_overrides(self) -> dict[str, Any]:
        """`from_pretrained` arguments for final/ (default: the same extra parts as a sample grid's pipeline)."""
        return self.extra_parts()

    def save_pipeline(self, denoiser: nn.Module, out: Path) -> None:
        """final/ of a full fine-tune: the tuned denoiser inside the original pipeline, the frozen parts re-read
        in full precision (and `model.vae` when one was given)."""
        m = self.cfg
        extra = dict(self.save_overrides())
        if m.vae is not None:
            extra["vae"] = load_vae(m, self.index)
        pipe = load_pipeline_class(self.pipeline_class, m.pretrained, self.index, m.revision, variant=m.variant,
                                   **{self.denoiser_role: denoiser}, **extra)
        pipe.save_pretrained(out, safe_serialization=True)
        restore_processor_folders(self.index, m.pretrained, m.revision, out)

    def save_lora(self, denoiser: nn.Module, out_dir: Path) -> None:
        """Write `pytorch_lora_weights.safetensors` that the family pipeline's `load_lora_weights(out_dir)` reads."""
        weights, metadata = lora_state_dict(denoiser, self.lora_diffusers_naming)
        self.pipeline_class.save_lora_weights(out_dir, **{f"{self.denoiser_role}_lora_layers": weights,
                                                          f"{self.denoiser_role}_lora_adapter_metadata": metadata},
                                              safe_serialization=True)

    # ------------------------------------------------------------------ generate (a loaded diffusers pipeline)
    @classmethod
    def latent_channels(cls, pipe: Any) -> int:
        """Channels of the initial noise x_T the pipeline's denoiser takes."""
        return getattr(pipe, cls.denoiser_role).config.in_channels

    @classmethod
    def native_size(cls, pipe: Any) -> int:
        """The pipeline's default image side in pixels."""
        return getattr(pipe, cls.denoiser_role).config.sample_size * pipe.vae_scale_factor

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        """Image sides must be multiples of this."""
        return pipe.vae_scale_factor

    guidance_parameter: ClassVar[str] = "guidance_scale"  # the pipeline-call argument the guidance scale sets

    @classmethod
    def guidance_kwargs(cls, scale: Optional[float], batch: int) -> dict[str, Any]:
        """Pipeline-call arguments for classifier-free guidance of `scale`, for `batch` prompts."""
        return {"guidance_scale": scale}

    @classmethod
    def latent_factor(cls, pipe: Any) -> int:
        """Image side / the side of the initial noise the pipeline takes (FLUX.2's patchify doubles the VAE's)."""
        return pipe.vae_scale_factor

    @classmethod
    def pipeline_latents(cls, noise: Tensor) -> Tensor:
        """(B, C, h, w) initial noise in the layout the pipeline's `latents=` argument takes."""
        return noise
