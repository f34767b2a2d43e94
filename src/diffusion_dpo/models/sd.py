"""Stable Diffusion 1.x/2.x and SDXL: a UNet on a DDPM schedule, epsilon or v prediction.

  SD 1.x/2.x  one CLIP text encoder, its last hidden state (B, 77, D).
  SDXL        two CLIP encoders, both penultimate hidden states concatenated (B, 77, 768 + 1280), the second's
              pooled projection (B, 1280), and each image's original size and crop offsets as six time ids
              (orig_h, orig_w, top, left, target_h, target_w): by default (res, res, 0, 0, res, res) for every
              image, as the official DiffusionDPO code, so a pair's two images share it; `model.sdxl_time_ids
              image` gives each image its own size and crop, which may correlate with the preference.

Training schedule: the checkpoint's betas in a `DDPMScheduler`, t ~ U{0, ..., T-1} per pair, x_t = add_noise(x_0,
eps, t), target eps (epsilon) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (v_prediction), as the scheduler config (or
`model.prediction_type`) says. Sampling grids use the checkpoint's own sampling scheduler (PNDM for SD1.5,
Euler for SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffusion_dpo.config import FlowConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.family import Family, ids_key


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for [winners; losers] (2B latents)."""

    hidden_states: Tensor  # (2B, L, D) text encoder hidden states
    added: Optional[dict[str, Tensor]] = None  # SDXL: text_embeds (2B, P), time_ids (2B, 6)


class StableDiffusion(Family):
    """SD 1.x/2.x: one CLIP text encoder, a UNet2DConditionModel."""

    name: ClassVar[str] = "sd"
    title: ClassVar[str] = "Stable Diffusion 1.x/2.x"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    denoiser_role: ClassVar[str] = "unet"
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_diffusers_naming: ClassVar[bool] = True  # as diffusers' SD/SDXL LoRA scripts save a UNet's adapter
    card_tags: ClassVar[tuple[str, ...]] = ("stable-diffusion", "stable-diffusion-diffusers")
    settings: ClassVar[tuple[str, ...]] = ("prediction_type",)

    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        return [("text_encoder", "tokenizer")]

    @classmethod
    def schedule_identity(cls, cfg: ModelConfig, flow: FlowConfig) -> dict[str, Any]:
        return {"model.prediction_type": cfg.prediction_type}

    @classmethod
    def load_scheduler(cls, cfg: ModelConfig) -> Any:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler", revision=cfg.revision)
        if cfg.prediction_type is not None:
            scheduler.register_to_config(prediction_type=cfg.prediction_type)
        return scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"hidden": (B, L, D)}: the text encoder's last hidden state."""
        encoder = self.text_encoders[0]
        return {"hidden": encoder(ids["input_ids"].to(encoder.device))[0]}

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> Conditioning:
        g = self.images_per_item(original_sizes)  # 2 for a pair, 1 for unpaired feedback
        return Conditioning(encodings["hidden"].repeat(g, 1, 1))  # (2B, L, D): a pair's images share the prompt

    # ------------------------------------------------------------------ schedule
    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, int, int],
                      device: torch.device | str) -> Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=generator, device=device)

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        return self.scheduler.add_noise(latents, noise, timesteps), self.target(latents, noise, timesteps).float()

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target: ε for epsilon-prediction, v for v-prediction (from the scheduler config)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise UserError(f"{self.pretrained}: unsupported prediction_type '{self.prediction_type}' "
                        "(epsilon or v_prediction)")

    # ------------------------------------------------------------------ denoiser
    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        return model(noisy, timesteps, cond.hidden_states, added_cond_kwargs=cond.added).sample

    # ------------------------------------------------------------------ outputs
    def sampling_scheduler(self) -> Any:
        """The checkpoint's own sampling scheduler class (PNDM for SD1.5, Euler for SDXL) on the training config."""
        import diffusers

        config = dict(self.scheduler.config)
        entry = self.index.get("scheduler") or [None, None]
        original = getattr(diffusers, entry[1] or "", None)
        if isinstance(original, type) and issubclass(original, diffusers.SchedulerMixin):
            return original.from_config(config)
        return type(self.scheduler).from_config(config)

    def extra_parts(self) -> dict[str, Any]:
        # evaluation and training grids show what the model draws; a blacked-out image says nothing
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        return 8  # the SD and SDXL pipelines' own check, whatever the VAE's downsampling


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP text encoders (penultimate layers), the pooled embedding and per-image size/crop time ids."""

    name: ClassVar[str] = "sdxl"
    title: ClassVar[str] = "Stable Diffusion XL"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    size_conditioning: ClassVar[bool] = True
    settings: ClassVar[tuple[str, ...]] = ("prediction_type", "sdxl_time_ids")
    card_tags: ClassVar[tuple[str, ...]] = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    @classmethod
    def schedule_identity(cls, cfg: ModelConfig, flow: FlowConfig) -> dict[str, Any]:
        # the time ids change every error the reference makes; "image" keeps the identity of references made when it
        # was the default (before 2026-12-07)
        extra = {"model.sdxl_time_ids": "constant"} if cfg.sdxl_time_ids != "image" else {}
        return {**super().schedule_identity(cfg, flow), **extra}

    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"hidden": (B, L, D1 + D2), "pooled": (B, P)}."""
        hidden, pooled = [], None
        for k, encoder in enumerate(self.text_encoders):
            out = encoder(ids[ids_key(k)].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]  # the last encoder (with projection) gives the pooled text embedding
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> Conditioning:
        """time_ids = (res, res, 0, 0, res, res) for every image (`model.sdxl_time_ids` constant or auto, the official
        DiffusionDPO code's), or with `image` (orig_h, orig_w, top, left, target_h, target_w) per image, winners
        first."""
        g = self.images_per_item(original_sizes)  # 2 for a pair, 1 for unpaired feedback
        hidden, pooled = encodings["hidden"].repeat(g, 1, 1), encodings["pooled"]
        sizes = torch.cat(original_sizes.unbind(1))  # (2B, 2), winners first
        crops = torch.cat(crop_top_lefts.unbind(1))
        if self.cfg.sdxl_time_ids != "image":
            sizes, crops = torch.full_like(sizes, resolution), torch.zeros_like(crops)
        target = torch.tensor([resolution, resolution]).expand(sizes.shape[0], 2)
        # built on the host from the batch, copied without waiting for the device (no sync in the step)
        time_ids = torch.cat([sizes.cpu(), crops.cpu(), target], dim=1).to(pooled.device, pooled.dtype,
                                                                           non_blocking=True)
        return Conditioning(hidden, {"text_embeds": pooled.repeat(g, 1), "time_ids": time_ids})

    def extra_parts(self) -> dict[str, Any]:
        return {}
