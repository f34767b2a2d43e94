"""Z-Image: `ZImageTransformer2DModel`, a single-stream DiT, on flow matching (models/flow.py), conditioned exactly as
`ZImagePipeline.encode_prompt` builds it:

    text     each prompt as one user turn of Qwen3's chat template, the assistant turn opened (enable_thinking=True:
             no think block), tokenized to max_sequence_length (512, the pipeline's), Qwen3's second-to-last hidden
             state (hidden_states[-2]) at the prompt's real tokens only: padding is dropped, so each prompt has its
             own length (the transformer pads every stream to a multiple of 32 with a learned token itself)
    latents  FLUX.1's VAE (16 channels, (z - 0.1159) * 0.3611), handed over as a list of (C, 1, h, w): the
             transformer patchifies them 2x2 itself
    timestep the transformer takes 1 - sigma (the pipeline's (1000 - t) / 1000), and the pipeline negates its output
             before the scheduler step: -output is the velocity noise - x_0 every flow family regresses, so
             `predict` returns -output

Guidance is classifier-free at sampling time (no guidance embedding): training conditions on the prompt alone. The
shift is the scheduler's (`flow.shift` overrides it), as for SD3 and FLUX.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusion_dpo.models.llm import ChatTokenizer, LLMConditioned

# Every linear of the attention and the SwiGLU feed-forward of each block (the main layers and both refiners).
LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3")


@dataclass
class TokenConditioning:
    """Each image's text tokens, for [winners; losers]: a list of (L_i, D), one length per prompt."""

    features: list[Tensor]


class ZImage(LLMConditioned):
    name: ClassVar[str] = "zimage"
    title: ClassVar[str] = "Z-Image"
    pipelines: ClassVar[tuple[str, ...]] = ("ZImagePipeline",)
    card_tags: ClassVar[tuple[str, ...]] = ("z-image", "z-image-diffusers")
    text_encoder_title: ClassVar[str] = "Qwen3"
    default_lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    default_max_sequence_length: ClassVar[int] = 512  # ZImagePipeline's

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = ChatTokenizer(self.tokenizers[0], self.max_sequence_length, (("enable_thinking", True),))

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"hidden": (B, L, D) Qwen3's second-to-last hidden state, zero at the padding; "mask": (B, L) 1 at the
        prompt's tokens}: stored padded with the mask, cut to each prompt's tokens in `conditioning`."""
        encoder = self.text_encoders[0]
        mask = ids["attention_mask"].to(encoder.device)
        hidden = encoder(input_ids=ids["input_ids"].to(encoder.device), attention_mask=mask.bool(),
                         output_hidden_states=True).hidden_states[-2]
        return {"hidden": hidden * mask[..., None].to(hidden.dtype), "mask": mask.to(hidden.dtype)}

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> TokenConditioning:
        features = [h[m > 0.5] for h, m in zip(encodings["hidden"], encodings["mask"])]
        return TokenConditioning(features * self.images_per_item(original_sizes))

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: TokenConditioning) -> Tensor:
        out = model(list(noisy.unsqueeze(2).unbind(0)), 1 - timesteps, cond.features, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the pipeline's sign: -output is noise - x_0

    def latent_multiple(self) -> int:
        return self.denoiser_config["all_patch_size"][0]

    # ------------------------------------------------------------------ generate
    @classmethod
    def native_size(cls, pipe: Any) -> int:
        return 1024  # ZImagePipeline's default height and width

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        return 2 * pipe.vae_scale_factor
