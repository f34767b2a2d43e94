"""The VAE every family shares: where it lives (the pipeline's vae/ or `model.vae`), its config, and how its
posterior becomes the denoiser's latents.

`sample_latents` is the one formula for encoding on the fly and for reading the pre-encoded cache, which stores
posterior parameters, not latents (see diffusion_dpo.cache): (mean + std * eps - shift) * scaling, with the VAE config's
`scaling_factor` and `shift_factor` (SD/SDXL have no shift; SD3's and FLUX's VAEs do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError, is_local_path


@dataclass(frozen=True)
class LatentScale:
    """How VAE posterior samples become the denoiser's latents: (sample - shift) * scaling (the VAE config's)."""

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


def downsampling(vae_config: Any) -> int:
    """The VAE's spatial downsampling factor f (8 for every released SD/SD3/FLUX VAE)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


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


def load_vae(cfg: ModelConfig) -> nn.Module:
    """The pipeline's VAE, or `cfg.vae` (see `vae_location`)."""
    from diffusers import AutoencoderKL

    variant = dict(variant=cfg.variant) if cfg.vae is None else {}
    return _vae_call(cfg, lambda where, **kw: AutoencoderKL.from_pretrained(where, **kw, **variant))


def load_vae_config(cfg: ModelConfig) -> Any:
    """The VAE's config only (latent channels, downsampling, scaling and shift factors); no weights are read."""
    from diffusers import AutoencoderKL

    return _vae_call(cfg, AutoencoderKL.load_config)
