"""FLUX.1 (dev and schnell): `FluxTransformer2DModel` on flow matching (models/flow.py), conditioned as
`FluxPipeline.encode_prompt` builds it: CLIP-L's pooled output (B, 768) and T5's last hidden state (B, L, 4096).

The transformer sees the latents (N, C, h, w) packed 2x2 into tokens, (N, h/2 * w/2, 4C), with position ids
(0, row, col) per token and zeros for the text tokens; its prediction is unpacked back, so the per-sample error is
the mean over the same latent elements as every other family. It takes timestep = sigma (the pipeline passes
t / 1000; the model scales by 1000 inside).

Guidance-distilled models (FLUX.1-dev: `guidance_embeds` in the transformer config) also take a guidance value;
training feeds `model.guidance`, default 3.5 (diffusers' train_dreambooth_lora_flux.py --guidance_scale and
Flow-Factory's training_args.guidance_scale). FLUX.1-schnell has no guidance embedding.

FLUX cannot run without its T5: a checkpoint without text_encoder_2, or `model.t5 false`, is refused.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.flow import ATTENTION_TARGETS, FlowMatching, GuidanceEmbedded, JointConditioning
from diffusion_dpo.models.packing import PackedLatents, image_ids, pack, unpack

class Flux(GuidanceEmbedded, PackedLatents, FlowMatching):
    name: ClassVar[str] = "flux"
    title: ClassVar[str] = "FLUX.1"
    pipelines: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    card_tags: ClassVar[tuple[str, ...]] = ("flux", "flux-diffusers")
    denoiser_role: ClassVar[str] = "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]] = ATTENTION_TARGETS
    default_max_sequence_length: ClassVar[int] = 512
    max_max_sequence_length: ClassVar[int | None] = 512

    settings: ClassVar[tuple[str, ...]] = ("t5", "max_sequence_length", "guidance")
    default_guidance: ClassVar[float] = 3.5  # FluxPipeline's; diffusers' and Flow-Factory's FLUX.1 training

    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]

    @classmethod
    def check_index(cls, index: dict, cfg: ModelConfig, name: str) -> None:
        super().check_index(index, cfg, name)
        if not cfg.t5:
            raise UserError("model.t5 false: FLUX.1 cannot run without its T5 encoder (only SD3 can)")
        if (index.get("text_encoder_2") or [None])[0] is None or (index.get("tokenizer_2") or [None])[0] is None:
            raise UserError(f"{name} is a FLUX model without its T5 encoder (text_encoder_2/tokenizer_2 in "
                            "model_index.json); FLUX.1 needs it")

    def token_lengths(self) -> list[int]:
        return [self.tokenizers[0].model_max_length, self.max_sequence_length]

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"pooled": (B, P) CLIP-L's pooler output, "t5": (B, L, D) T5's last hidden state}."""
        clip, t5 = self.text_encoders
        return {"pooled": clip(ids["input_ids"].to(clip.device)).pooler_output,
                "t5": t5(ids["input_ids_2"].to(t5.device))[0]}

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> JointConditioning:
        t5, pooled = encodings["t5"], encodings["pooled"]
        g = self.images_per_item(original_sizes)  # 2 for a pair, 1 for unpaired feedback
        return JointConditioning(t5.repeat(g, 1, 1), pooled.repeat(g, 1), self.guidance_tensor(g * t5.shape[0], t5.device))

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: JointConditioning) -> Tensor:
        n, c, h, w = noisy.shape
        text_ids = torch.zeros(cond.hidden_states.shape[1], 3, device=noisy.device)
        out = model(hidden_states=pack(noisy), timestep=timesteps, guidance=cond.guidance,
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden_states, txt_ids=text_ids,
                    img_ids=image_ids(h // 2, w // 2, noisy.device)).sample
        return unpack(out, c, h, w)
