"""Qwen-Image: `QwenImageTransformer2DModel`, an MMDiT, on flow matching (models/flow.py), conditioned exactly as
`QwenImagePipeline.encode_prompt` builds it:

    text     each prompt inside the pipeline's fixed system-prompt template, through Qwen2.5-VL; the last hidden
             state at the real tokens, the template's first 34 tokens dropped (`prompt_template_encode_start_idx`),
             at most max_sequence_length (512, the pipeline's call default) kept; prompts of a batch zero-padded to
             the longest with a mask the transformer applies (no mask when none is padded, as the pipeline)
    latents  `AutoencoderKLQwenImage`, a video VAE: an image is one frame; per channel (z - latents_mean) /
             latents_std (models/vae.py), packed 2x2 into tokens (B, h/2 w/2, 4C) as FLUX.1's, with
             img_shapes (1, h/2, w/2) for the transformer's RoPE
    timestep sigma (the pipeline passes t / 1000), and the output is the velocity noise - x_0

Qwen-Image has no guidance embedding; it samples with true classifier-free guidance when given a negative prompt.
The tokenizer pads every prompt to max_sequence_length + 34 tokens where the pipeline pads to the batch's longest:
Qwen2.5-VL is causal and masked, so the hidden states at the real tokens are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from diffusion_dpo.models.llm import LLMConditioned
from diffusion_dpo.models.packing import PackedLatents, pack, unpack

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")  # QwenImagePipeline.prompt_template_encode
TEMPLATE_TOKENS = 34  # QwenImagePipeline.prompt_template_encode_start_idx: the template's tokens before the prompt

# verl-omni's Qwen-Image DPO recipe and flow_grpo's Qwen-Image scripts (diffusers' names): the joint attention of both
# streams and both streams' feed-forwards.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")


@dataclass(frozen=True)
class TemplateTokenizer:
    """Prompts -> {"input_ids", "attention_mask"} (N, L): each prompt put in `template` and tokenized, padded and
    truncated to L. Picklable: it runs in the DataLoader workers."""

    tokenizer: Any
    template: str
    length: int
    keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer([self.template.format(p) for p in prompts], padding="max_length", max_length=self.length,
                             truncation=True, return_tensors="pt")
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}


@dataclass
class MaskedConditioning:
    """Text tokens for [winners; losers], zero-padded to the longest with their mask (None: none padded)."""

    hidden_states: Tensor  # (2B, L, D)
    mask: Optional[Tensor]  # (2B, L) 1 at real tokens


class QwenImage(PackedLatents, LLMConditioned):
    name: ClassVar[str] = "qwenimage"
    title: ClassVar[str] = "Qwen-Image"
    pipelines: ClassVar[tuple[str, ...]] = ("QwenImagePipeline",)
    card_tags: ClassVar[tuple[str, ...]] = ("qwen-image", "qwen-image-diffusers")
    text_encoder_title: ClassVar[str] = "Qwen2.5-VL"
    default_lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    default_max_sequence_length: ClassVar[int] = 512  # QwenImagePipeline.__call__'s
    max_max_sequence_length: ClassVar[int | None] = 1024  # the pipeline refuses more

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = TemplateTokenizer(self.tokenizers[0], TEMPLATE, self.max_sequence_length + TEMPLATE_TOKENS)

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"hidden": (B, L, D), "mask": (B, L)}, L = max_sequence_length: each prompt's last hidden states after the
        template's first tokens, moved to the front and zero-padded."""
        encoder = self.text_encoders[0]
        mask = ids["attention_mask"].to(encoder.device)
        hidden = encoder(input_ids=ids["input_ids"].to(encoder.device), attention_mask=mask, output_hidden_states=True,
                         use_cache=False, logits_to_keep=1).hidden_states[-1]  # no vocabulary-wide logits
        length = self.max_sequence_length
        out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
        kept = torch.zeros(hidden.shape[0], length, dtype=hidden.dtype, device=hidden.device)
        for i, (h, m) in enumerate(zip(hidden, mask)):
            tokens = h[m.bool()][TEMPLATE_TOKENS:TEMPLATE_TOKENS + length]
            out[i, :len(tokens)], kept[i, :len(tokens)] = tokens, 1
        return {"hidden": out, "mask": kept}

    def unused_parameters(self) -> tuple[str, ...]:
        # the transformer returns the image tokens only: the last block's update of the text tokens (attention's text
        # output projection, the text feed-forward) reaches nothing (SD3's last block leaves them out instead)
        last = f"transformer_blocks.{len(self.denoiser.transformer_blocks) - 1}"
        return (f"{last}.attn.to_add_out", f"{last}.txt_mlp")

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> MaskedConditioning:
        mask = encodings["mask"] > 0.5
        longest = max(int(mask.sum(1).max()), 1)
        g = self.images_per_item(original_sizes)
        hidden, mask = encodings["hidden"][:, :longest].repeat(g, 1, 1), mask[:, :longest].repeat(g, 1)
        return MaskedConditioning(hidden, None if bool(mask.all()) else mask.long())

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: MaskedConditioning) -> Tensor:
        n, c, h, w = noisy.shape
        out = model(hidden_states=pack(noisy), timestep=timesteps, guidance=None,
                    encoder_hidden_states=cond.hidden_states, encoder_hidden_states_mask=cond.mask,
                    img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]
        return unpack(out, c, h, w)

    # ------------------------------------------------------------------ generate
    guidance_parameter: ClassVar[str] = "true_cfg_scale"

    @classmethod
    def guidance_kwargs(cls, scale: Optional[float], batch: int) -> dict[str, Any]:
        # true classifier-free guidance, which the pipeline runs only with a negative prompt (its docs use " ");
        # its guidance_scale is for guidance-distilled checkpoints and is ignored otherwise
        return {"true_cfg_scale": scale, "negative_prompt": [" "] * batch}
