"""Text encoders that are chat LLMs (Qwen3 for Z-Image and FLUX.2 [klein]): prompts put in the encoder's chat
template as its pipeline does, tokenized in the DataLoader workers with their attention mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class ChatTokenizer:
    """Prompts -> {"input_ids", "attention_mask"}, each (N, L): every prompt put in the text encoder's chat template
    as one user turn with the assistant turn opened (`template` keyword arguments: Z-Image's enable_thinking=True),
    then tokenized, padded and truncated to L, as the pipeline does. Picklable: it runs in the DataLoader workers."""

    tokenizer: Any
    length: int
    template: tuple[tuple[str, Any], ...] = ()
    keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, **dict(self.template))
                 for p in prompts]
        out = self.tokenizer(texts, padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt")
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}
