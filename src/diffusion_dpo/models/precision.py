"""Precision helpers shared by every family: the frozen parts' dtype, and a cast that skips no-op casts."""

from __future__ import annotations

import torch
from torch import nn


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts (and the autocast dtype) for train.mixed_precision no/fp16/bf16."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def is_quantized(t: torch.Tensor) -> bool:
    """Whether a parameter is stored quantized: a tensor subclass (torchao's int8/fp8 weights, bitsandbytes'
    Params4bit), never cast (models/quantize.py)."""
    return type(t) not in (torch.Tensor, nn.Parameter) or type(t.data) is not torch.Tensor


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` only when it changes something (diffusers warns on every dtype cast); a module holding
    quantized weights has its other floating-point parameters and buffers cast one by one, the quantized left alone."""
    params = list(module.parameters())
    if not any(is_quantized(p) for p in params):
        if any(p.dtype != dtype for p in params):
            module.to(dtype)
        return module
    for t in [*params, *module.buffers()]:
        if not is_quantized(t) and t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    return module
