"""Precision helpers shared by every family: the frozen parts' dtype, and a cast that skips no-op casts."""

from __future__ import annotations

import torch
from torch import nn


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts (and the autocast dtype) for train.mixed_precision no/fp16/bf16."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` only when it changes something (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module
