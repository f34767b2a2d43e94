"""FLUX.2 [klein] and [dev]: `Flux2Transformer2DModel` on flow matching (models/flow.py), conditioned exactly as
`Flux2KleinPipeline` and `Flux2Pipeline` build it. [klein]:

    text     each prompt as one user turn of Qwen3's chat template, the assistant turn opened with an empty think
             block (enable_thinking=False), tokenized to max_sequence_length (512, the pipeline's) with padding; the
             hidden states of layers 9, 18 and 27 (`text_encoder_out_layers`) side by side per token: (B, L, 3 D).
             Every one of the L tokens is attended to, padding included (the pipeline passes no mask)
    latents  `AutoencoderKLFlux2`: the posterior 2x2-patchified (32 -> 128 channels) and normalised by the VAE's
             BatchNorm running statistics (models/vae.py), then one token per latent pixel, (B, h w, 128), with
             4-axis position ids (t, h, w, l) = (0, row, col, 0) and (0, 0, 0, i) for the text tokens
    timestep sigma (the pipeline passes t / 1000), and the output is the velocity noise - x_0 as for FLUX.1

klein has no guidance embedding; distilled klein checkpoints sample without classifier-free guidance, base ones with
it (against the empty prompt).

[dev] differs in its text encoder and its guidance:

    text     each prompt as the user turn after the pipeline's system message (diffusers' `format_input` and
             SYSTEM_MESSAGE, reused), rendered in Mistral Small 3.1's chat template without a generation prompt and
             tokenized to 512 with padding; the hidden states of layers 10, 20 and 30 side by side, every token
             attended to, as for klein. The checkpoint's tokenizer slot holds a PixtralProcessor; text prompts never
             reach its image processor, so only its tokenizer is loaded (models/loading.py), tokenizing as the
             processor's `apply_chat_template` does (models/llm.py)
    guidance a guidance-distilled transformer: training feeds `model.guidance`, default 4.0 (Flux2Pipeline's
             guidance_scale; Flow-Factory's FLUX.2 training); no classifier-free guidance at sampling

The shift is the scheduler's: FLUX.2's shifts dynamically at sampling time (`compute_empirical_mu`), so training
draws sigma unshifted, as for FLUX.1-dev (`flow.shift` overrides).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusion_dpo.models.flow import ATTENTION_TARGETS, GuidanceEmbedded, JointConditioning
from diffusion_dpo.models.llm import ChatTokenizer, LLMConditioned

# Flow-Factory's FLUX.2 and FLUX.2-klein adapters (src/flow_factory/models/flux/flux2_klein.py): the double-stream
# blocks' attention projections (as FLUX.1's) and SwiGLU feed-forwards of both streams, and the single-stream blocks'
# fused QKV+MLP input. The single blocks' fused output `attn.to_out` is a plain Linear that "attn.to_out.0" does not
# reach and a bare "to_out" would also name the double blocks' ModuleList (which peft refuses); DiffSynth-Studio
# lists it block by block (single_transformer_blocks.N.attn.to_out), which lora.target_modules can do too.
LORA_TARGETS = ATTENTION_TARGETS + ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                                    "attn.to_qkv_mlp_proj")


def pack(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h w, C): one token per latent pixel, row-major (Flux2KleinPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack`: (N, h w, C) -> (N, C, h, w)."""
    n, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(n, c, height, width)


def position_ids(rows: int, cols: int, text: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(rows cols, 4) image ids (0, row, col, 0) and (text, 4) text ids (0, 0, 0, i), as the pipeline's
    `_prepare_latent_ids` and `_prepare_text_ids` make them (the transformer reads one set for the whole batch)."""
    zero = torch.zeros(1, dtype=torch.long)
    image = torch.cartesian_prod(zero, torch.arange(rows), torch.arange(cols), zero)
    words = torch.cartesian_prod(zero, zero, zero, torch.arange(text))
    return image.to(device), words.to(device)


def mistral_turns(prompt: str) -> list[dict[str, Any]]:
    """Flux2Pipeline's conversation for a prompt: its system message, then the prompt as the user turn."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    return format_input([prompt], system_message=SYSTEM_MESSAGE)[0]


class Flux2Family(GuidanceEmbedded, LLMConditioned):
    """What FLUX.2 [klein] and [dev] share: the transformer's inputs, the stacked hidden layers, the 2x2 patchify."""

    card_tags: ClassVar[tuple[str, ...]] = ("flux2", "flux2-diffusers")
    default_lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    default_max_sequence_length: ClassVar[int] = 512  # both pipelines'
    text_layers: ClassVar[tuple[int, ...]]  # the pipeline's text_encoder_out_layers
    settings: ClassVar[tuple[str, ...]] = ("t5", "max_sequence_length", "guidance")
    default_guidance: ClassVar[float] = 4.0  # Flux2Pipeline's guidance_scale (klein has no guidance embedding)

    @torch.no_grad()
    def encode_prompt(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"hidden": (B, L, 3 D)}: the encoder's hidden states of `text_layers` side by side, at every token."""
        encoder = self.text_encoders[0]
        out = encoder(input_ids=ids["input_ids"].to(encoder.device),
                      attention_mask=ids["attention_mask"].to(encoder.device), output_hidden_states=True,
                      use_cache=False, logits_to_keep=1)  # hidden states only: no vocabulary-wide logits
        return {"hidden": torch.cat([out.hidden_states[k] for k in self.text_layers], dim=-1)}

    def conditioning(self, encodings: dict[str, Tensor], original_sizes: Tensor, crop_top_lefts: Tensor,
                     resolution: int) -> JointConditioning:
        hidden = encodings["hidden"].repeat(self.images_per_item(original_sizes), 1, 1)
        return JointConditioning(hidden, None, self.guidance_tensor(hidden.shape[0], hidden.device))

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: JointConditioning) -> Tensor:
        n, c, h, w = noisy.shape
        image_ids, text_ids = position_ids(h, w, cond.hidden_states.shape[1], noisy.device)
        out = model(hidden_states=pack(noisy), encoder_hidden_states=cond.hidden_states, timestep=timesteps,
                    img_ids=image_ids, txt_ids=text_ids, guidance=cond.guidance, return_dict=False)[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------ generate
    @classmethod
    def latent_factor(cls, pipe: Any) -> int:
        return 2 * pipe.vae_scale_factor  # the 2x2 patchify

    @classmethod
    def native_size(cls, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        return 2 * pipe.vae_scale_factor


class Flux2Klein(Flux2Family):
    name: ClassVar[str] = "flux2-klein"
    title: ClassVar[str] = "FLUX.2 [klein]"
    pipelines: ClassVar[tuple[str, ...]] = ("Flux2KleinPipeline",)
    text_encoder_title: ClassVar[str] = "Qwen3"
    text_layers: ClassVar[tuple[int, ...]] = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = ChatTokenizer(self.tokenizers[0], self.max_sequence_length, (("enable_thinking", False),))

    def extra_parts(self) -> dict[str, Any]:
        # a step-distilled klein samples without classifier-free guidance: the pipeline reads it from this flag
        return {"is_distilled": bool(self.index.get("is_distilled", False))}

    def save_overrides(self) -> dict[str, Any]:
        return {}  # from_pretrained reads is_distilled from the base's model_index.json


class Flux2(Flux2Family):
    name: ClassVar[str] = "flux2"
    title: ClassVar[str] = "FLUX.2 [dev]"
    pipelines: ClassVar[tuple[str, ...]] = ("Flux2Pipeline",)
    text_encoder_title: ClassVar[str] = "Mistral Small 3.1"
    text_layers: ClassVar[tuple[int, ...]] = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer = ChatTokenizer(self.tokenizers[0], self.max_sequence_length, conversation=mistral_turns,
                                       generation_prompt=False)
