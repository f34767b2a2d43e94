"""The VAE of a family: where it lives (the pipeline's vae/ or `model.vae`), its class and config, and how its
posterior becomes the denoiser's latents.

`sample_latents` is the one formula for encoding on the fly and for reading the pre-encoded cache, which stores
posterior parameters, not latents (see diffusion_dpo.cache): z = (patchify(mean + std * eps) - shift) * scaling,
per channel (`LatentScale`):

  SD 1.x/2.x, SDXL        one scaling_factor, no shift                                   (AutoencoderKL)
  SD3, FLUX.1, Z-Image    scaling_factor and shift_factor                                (AutoencoderKL)
  Qwen-Image              per channel: shift latents_mean, scaling 1 / latents_std       (AutoencoderKLQwenImage,
                          a video VAE: an image is one frame, the frame axis is dropped)
  FLUX.2                  2x2 patchify (C -> 4C), then the BatchNorm's running mean and  (AutoencoderKLFlux2; the
                          1 / sqrt(running_var + batch_norm_eps), per channel             statistics are weights)

as each family's pipeline normalises latents (the inverse of what it does before `vae.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError, is_local_path

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderKLFlux2")  # the VAEs a family may name
FLUX2_STATISTICS = ("bn.running_mean", "bn.running_var")  # AutoencoderKLFlux2's latent statistics (buffers)


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, h, w) -> (N, C p², h/p, w/p), channels ordered (c, row in patch, column in patch), as FLUX.2's
    `_patchify_latents`; p = 1 returns x."""
    if p == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(n, c * p * p, h // p, w // p)


@dataclass(frozen=True)
class LatentScale:
    """How VAE posterior samples become the denoiser's latents: (patchify(sample) - shift) * scaling, per channel
    (one value: every channel). See the module docstring for each family's."""

    scaling: tuple[float, ...]
    shift: tuple[float, ...] = (0.0,)
    patch: int = 1

    @classmethod
    def of(cls, vae_config: Any, statistics: Optional[Callable[[], dict[str, Tensor]]] = None) -> "LatentScale":
        """The scale a VAE's config (and, for FLUX.2, its BatchNorm statistics: `statistics()`) implies."""
        if vae_config.get("latents_mean") is not None:  # Qwen-Image: per-channel mean and std
            return cls(tuple(1.0 / float(s) for s in vae_config["latents_std"]),
                       tuple(float(m) for m in vae_config["latents_mean"]))
        if vae_config.get("batch_norm_eps") is not None:  # FLUX.2: patchify, then the BatchNorm's running statistics
            if statistics is None:
                raise ValueError("a FLUX.2 VAE's latent scale needs its BatchNorm statistics")
            stats = statistics()
            std = torch.sqrt(stats["bn.running_var"].double() + float(vae_config["batch_norm_eps"]))
            patch = vae_config.get("patch_size", (2, 2))
            return cls(tuple((1.0 / std).tolist()), tuple(stats["bn.running_mean"].double().tolist()),
                       int(patch[0] if isinstance(patch, (list, tuple)) else patch))
        return cls((float(vae_config["scaling_factor"]),), (float(vae_config.get("shift_factor", None) or 0.0),))

    def apply(self, sample: Tensor) -> Tensor:
        """(N, C, h, w) VAE latents -> (N, C p², h/p, w/p) denoiser latents."""
        x = patchify(sample, self.patch)
        if len(self.shift) == 1 and len(self.scaling) == 1:  # one value: the arithmetic SD's and SD3's always had
            return (x - self.shift[0]) * self.scaling[0]
        shape = (1, -1, 1, 1)
        shift = torch.tensor(self.shift, dtype=x.dtype, device=x.device).view(shape)
        scaling = torch.tensor(self.scaling, dtype=x.dtype, device=x.device).view(shape)
        return (x - shift) * scaling

    def to_json(self) -> dict[str, Any]:
        return {"scaling": list(self.scaling), "shift": list(self.shift), "patch": self.patch}


def sample_latents(mean: Tensor, std: Tensor, eps: Optional[Tensor], scale: LatentScale) -> Tensor:
    """The denoiser's latents from the VAE posterior N(mean, std²): `scale` applied to mean + std * eps, or to the
    mean when eps is None. The one formula for encoding on the fly and for the pre-encoded cache."""
    latents = mean if eps is None else mean + std * eps.to(mean)
    return scale.apply(latents)


def vae_posterior(vae: nn.Module, pixel_values: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Pixels (N, 3, H, W) in [-1, 1] -> the posterior's mean and std, each (N, C, H/f, W/f), `batch` images per
    encode call, in the VAE's dtype; a video VAE (Qwen-Image's) sees each image as one frame."""
    dtype, frames = next(vae.parameters()).dtype, video_vae(vae.config)
    means, stds = [], []
    for part in pixel_values.split(batch):
        part = part.to(vae.device, dtype)
        dist = vae.encode(part.unsqueeze(2) if frames else part).latent_dist
        means.append(dist.mean[:, :, 0] if frames else dist.mean)
        stds.append(dist.std[:, :, 0] if frames else dist.std)
    return torch.cat(means), torch.cat(stds)


def video_vae(vae_config: Any) -> bool:
    """Whether the VAE encodes videos (Qwen-Image's: (N, 3, frames, H, W) in, an image being one frame)."""
    return vae_config.get("temperal_downsample") is not None


def downsampling(vae_config: Any) -> int:
    """The VAE's spatial downsampling factor f (8 for every released VAE of our families)."""
    if video_vae(vae_config):
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_channels(vae_config: Any) -> int:
    """Channels of the VAE's posterior (before any patchify)."""
    return int(vae_config.get("latent_channels") or vae_config["z_dim"])


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
    return cfg.vae, dict(revision=cfg.vae_revision)


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


def vae_class(cfg: ModelConfig, index: Optional[dict] = None) -> type:
    """The diffusers VAE class: the one model_index.json names for the pipeline's vae/ (`index`), else, for
    `model.vae`, the one its config names; only the classes of VAE_CLASSES (no checkpoint names code)."""
    import diffusers

    if cfg.vae is None and index is not None and index.get("vae"):
        library, name = index["vae"]
        where = "model_index.json: vae"
    else:
        library, name = "diffusers", _vae_call(cfg, diffusers.AutoencoderKL.load_config).get("_class_name",
                                                                                          "AutoencoderKL")
        where = f"model.vae '{cfg.vae}'" if cfg.vae is not None else "vae/config.json"
    if library != "diffusers" or name not in VAE_CLASSES:
        raise UserError(f"{where} is {library}.{name}; the VAEs that load are diffusers' {', '.join(VAE_CLASSES)}")
    return getattr(diffusers, name)


def load_vae(cfg: ModelConfig, index: Optional[dict] = None) -> nn.Module:
    """The pipeline's VAE, or `cfg.vae` (see `vae_location`), of its own class (`vae_class`)."""
    cls = vae_class(cfg, index)
    variant = dict(variant=cfg.variant) if cfg.vae is None else {}
    return _vae_call(cfg, lambda where, **kw: cls.from_pretrained(where, **kw, **variant))


def load_vae_config(cfg: ModelConfig, index: Optional[dict] = None) -> Any:
    """The VAE's config only (latent channels, downsampling, scaling and shift factors); no weights are read."""
    return _vae_call(cfg, vae_class(cfg, index).load_config)


def vae_statistics(cfg: ModelConfig, names: tuple[str, ...] = FLUX2_STATISTICS) -> dict[str, Tensor]:
    """Buffers `names` of the VAE's weights file, read alone (training from a cache loads no VAE, yet FLUX.2's latent
    scale is its BatchNorm statistics)."""
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    where, kwargs = vae_location(cfg)
    sub = kwargs.get("subfolder")
    file = "diffusion_pytorch_model" + (f".{cfg.variant}" if cfg.variant and cfg.vae is None else "") + ".safetensors"
    if isinstance(where, Path) or Path(str(where)).expanduser().exists():
        path = Path(where).expanduser() / (sub or "") / file
    else:
        path = Path(_vae_call(cfg, lambda w, **kw: hf_hub_download(str(w), file, subfolder=kw.get("subfolder"),
                                                                   revision=kw.get("revision"))))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except (OSError, KeyError) as exc:
        raise UserError(f"the VAE's {path}: cannot read {', '.join(names)} ({str(exc).splitlines()[0]})") from None
