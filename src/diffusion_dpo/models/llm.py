"""Text encoders that are LLMs (Qwen3 for Z-Image and FLUX.2 [klein], Qwen2.5-VL for Qwen-Image, Mistral Small 3.1
for FLUX.2 [dev]): prompts put in the encoder's chat template as its pipeline does, tokenized in the DataLoader
workers with their attention mask; and what the families conditioned on one such encoder share (`LLMConditioned`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models.flow import FlowMatching


def user_turn(prompt: str) -> list[dict[str, Any]]:
    """A prompt as the one user turn of a conversation (Z-Image's, FLUX.2 [klein]'s)."""
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class ChatTokenizer:
    """Prompts -> {"input_ids", "attention_mask"}, each (N, L): every prompt made a conversation (`conversation`:
    one user turn by default) and rendered in the text encoder's chat template (`template` keyword arguments: Z-Image's
    enable_thinking=True; `generation_prompt`: the assistant turn opened), then tokenized, padded and truncated to L,
    as the pipeline does. Special tokens are added only where the rendered text does not already start with the BOS
    token: what a transformers processor's `apply_chat_template` does (FLUX.2 [dev]'s PixtralProcessor); Qwen's
    tokenizers have no BOS, so for them it is the plain `tokenizer(text)` their pipelines call. Picklable: it runs in
    the DataLoader workers (`conversation` is a module-level function)."""

    tokenizer: Any
    length: int
    template: tuple[tuple[str, Any], ...] = ()
    conversation: Callable[[str], list[dict[str, Any]]] = user_turn
    generation_prompt: bool = True
    keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        texts = [self.tokenizer.apply_chat_template(self.conversation(p), tokenize=False,
                                                    add_generation_prompt=self.generation_prompt,
                                                    **dict(self.template))
                 for p in prompts]
        bos = self.tokenizer.bos_token
        out = self.tokenizer(texts, padding="max_length", max_length=self.length, truncation=True,
                             add_special_tokens=not (bos is not None and texts[0].startswith(bos)),
                             return_tensors="pt")
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}


class LLMConditioned(FlowMatching):
    """A flow transformer conditioned on one LLM text encoder: its folders, and `model.t5` refused (there is none)."""

    denoiser_role: ClassVar[str] = "transformer"
    text_encoder_title: ClassVar[str]  # for messages, e.g. "Qwen3"

    @classmethod
    def text_roles(cls, index: dict, cfg: ModelConfig) -> list[tuple[str, str]]:
        return [("text_encoder", "tokenizer")]

    @classmethod
    def check_index(cls, index: dict, cfg: ModelConfig, name: str) -> None:
        super().check_index(index, cfg, name)
        if not cfg.t5:
            raise UserError(f"model.t5 false: {cls.title} has no T5 (its one text encoder is "
                            f"{cls.text_encoder_title}); leave it unset")
