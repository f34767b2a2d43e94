"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) on flow matching (models/flow.py), conditioned on
CLIP-L + CLIP-G + T5, exactly as `StableDiffusion3Pipeline.encode_prompt` builds it:

    clip   = [CLIP-L penultimate ; CLIP-G penultimate]       (B, 77, 768 + 1280), zero-padded to T5's width
    joint  = [clip ; T5 last hidden state]  on the sequence   (B, 77 + max_sequence_length, 4096)
    pooled = [CLIP-L pooled ; CLIP-G pooled]                  (B, 2048)

`model.t5 false` leaves T5 out as the pipeline does with text_encoder_3=None: zeros (B, max_sequence_length,
joint_attention_dim) take its place. The cache then stores no T5 encodings at all (the zeros are made at train time).
final/ still holds the base's T5, so that `from_pretrained(final)` loads it; sample such a model as it was trained
with `StableDiffusion3Pipeline.from_pretrained(final, text_encoder_3=None, tokenizer_3=None)`.

The transformer takes timestep = 1000 sigma (the scheduler's num_train_timesteps), as the pipeline passes
`scheduler.timesteps`. LoRA targets the eight joint-attention projections of each block's `attn` (flow_grpo's
train_sd3_dpo.py; not SD3.5-medium's second self-attention `attn2`). The pipeline takes at most 512 T5 tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.family import ids_key
from diffusion_dpo.models.flow import ATTENTION_TARGETS, FlowMatching, JointConditioning


class StableDiffusion3(FlowMatching):
    name: ClassVar[str] = "sd3"
    title: ClassVar[str] = "Stable Diffusion 3 / 3.5"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    card_tags: ClassVar[tuple[str, ...]] = ("sd3", "sd3-diffusers")
    denoiser_role: ClassVar[str] = "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]] = ATTENTION_TARGETS
    default_max_sequence_length: ClassVar[int] = 256
    max_max_sequence_length: ClassVar[int | None] = 512  # StableDiffusion3Pipeline refuses more

    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        roles = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
        return roles + ([("text_encoder_3", "tokenizer_3")] if cfg.t5 else [])

    @classmethod
    def check_index(cls, index: dict, cfg: ModelConfig, name: str) -> None:
        super().check_index(index, cfg, name)
        if cfg.t5 and (index.get("text_encoder_3") or [None])[0] is None:
            raise UserError(f"{name} has no T5 encoder (text_encoder_3); set model.t5 false to train without it")

    @classmethod
    def encoding_identity(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {"model.t5": cfg.t5, **super().encoding_identity(cfg)}

    def token_lengths(self) -> list[int]:
        clip = [tok.model_max_length for tok in self.tokenizers[:2]]
        return clip + ([self.max_sequence_length] if self.cfg.t5 else [])

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"clip": (B, 77, D_L + D_G), "pooled": (B, P_L + P_G), "t5": (B, max_sequence_length, D_T5)}."""
        hidden, pooled = [], []
        for k, encoder in enumerate(self.text_encoders[:2]):
            out = encoder(ids[ids_key(k)].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the pipeline's default (clip_skip None): penultimate layer
            pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
        encodings = {"clip": torch.cat(hidden, dim=-1), "pooled": torch.cat(pooled, dim=-1)}
        if self.cfg.t5:
            t5 = self.text_encoders[2]
            encodings["t5"] = t5(ids["input_ids_3"].to(t5.device))[0]
        return encodings

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> JointConditioning:
        clip = encodings["clip"]
        width = self.denoiser_config["joint_attention_dim"]
        clip = F.pad(clip, (0, width - clip.shape[-1]))  # (B, 77, width)
        t5 = encodings.get("t5")
        if t5 is None:  # model.t5 false: the pipeline's zeros for a missing text_encoder_3
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, width)
        joint = torch.cat([clip, t5], dim=-2)  # (B, 77 + L, width)
        g = self.images_per_item(original_sizes)  # 2 for a pair, 1 for unpaired feedback
        return JointConditioning(joint.repeat(g, 1, 1), encodings["pooled"].repeat(g, 1))

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: JointConditioning) -> Tensor:
        t = timesteps * self.scheduler.config.num_train_timesteps  # the pipeline passes sigma x 1000
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=cond.hidden_states,
                     pooled_projections=cond.pooled).sample

    def extra_parts(self) -> dict[str, Any]:
        return {} if self.cfg.t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def save_overrides(self) -> dict[str, Any]:
        # final/ keeps the base's T5 even when training left it out: diffusers' from_pretrained refuses a pipeline
        # saved without it unless text_encoder_3=None, tokenizer_3=None are passed, which is also how to sample
        # such a model as it was trained
        return {}

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def latent_multiple(self) -> int:
        return self.denoiser_config["patch_size"]
