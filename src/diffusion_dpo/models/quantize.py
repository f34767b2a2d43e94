"""A frozen base in fewer bits for LoRA runs (`model.quantize_base`), so that a 20B or 32B transformer's LoRA fits one
GPU: the linear layers inside the denoiser's repeated blocks are stored as

    int8   bitsandbytes' LLM.int8 (Linear8bitLt: one absmax scale per output row; input columns with outliers above
           6 computed in 16 bits, as diffusers' BitsAndBytesConfig(load_in_8bit=True) does): 1 byte a weight
    nf4    bitsandbytes' 4-bit NormalFloat (Linear4bit, QLoRA: one absmax per 64 weights), computing in the run's
           dtype: ~0.5 byte a weight
    fp8    torchao's float8 (e4m3) weight-only quantization, one scale per row: 1 byte a weight; meant for GPUs of
           compute capability 8.9 or more (H100, L40S, RTX 4090), where diffusers' FLUX.2 script trains in fp8 too

and the LoRA adapters train on top of them in fp32 (peft wraps bitsandbytes' and torchao's layers). Everything
outside the blocks (patch and text embeddings, timestep and guidance embedders, the final norm and projection) and
every norm stays in the compute dtype, as diffusers' and SimpleTuner's quantized trainers keep them: those layers are
small and the most sensitive.

A LoRA run's reference is the same base with its adapters off, so the policy and the reference share the quantized
weights: the DPO margin compares two models on one base, and the precomputed reference records the quantization in
its identity (a mismatch is refused). A full fine-tune cannot train quantized weights: refused in the config.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from diffusion_dpo.config import QUANTIZATIONS
from diffusion_dpo.errors import UserError

__all__ = ["QUANTIZATIONS", "block_linears", "quantize_base", "stored_bytes"]
_LIBRARY = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao"}


def block_linears(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear layers inside the model's block lists: an nn.ModuleList whose children are
    blocks, not layers (`transformer_blocks`, `single_transformer_blocks`, Z-Image's `layers` and refiners, a UNet's
    `down_blocks`); a ModuleList of linears such as attention's `to_out` is part of a block, not a list of blocks."""
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and not any(isinstance(c, (nn.Linear, nn.Dropout)) for c in m)]
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(name.startswith(prefix + ".") for prefix in lists)]


def quantize_base(model: nn.Module, how: str, compute_dtype: torch.dtype) -> int:
    """Quantize `model`'s block linears in place (`how` in QUANTIZATIONS), each on the device it is on, from its
    weights in `compute_dtype` (the dtype each matmul computes in); return how many layers were quantized."""
    if how == "none":
        return 0
    names = block_linears(model)
    if not names:
        raise UserError(f"model.quantize_base {how}: {type(model).__name__} has no linear layers inside block lists")
    _require(how)
    if how == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        for name in names:
            model.get_submodule(name).to(compute_dtype)
        quantize_(model, Float8WeightOnlyConfig(), filter_fn=_named(set(names)))
        return len(names)
    import bitsandbytes as bnb

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer: nn.Linear = getattr(parent, child)
        # from the host: bitsandbytes quantizes a weight as it is moved onto its device (as peft does it too)
        device, weight = layer.weight.device, layer.weight.data.to("cpu", compute_dtype)
        if how == "int8":
            quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
            quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, quantized.to(device))
    return len(names)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: its state dict, a quantized weight counted by its packed data and
    scales (bitsandbytes' state-dict entries; a torchao tensor's inner tensors)."""
    total = 0
    for t in model.state_dict().values():
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor:
            total += sum(_bytes(getattr(t, name)) for name in flatten()[0])
        else:
            total += _bytes(t)
    return total


def _bytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _named(chosen: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in chosen


def _require(how: str) -> None:
    library = _LIBRARY[how]
    try:
        __import__(library)
    except ImportError:
        raise UserError(f"model.quantize_base {how} needs {library}: pip install {library}") from None
    if how == "fp8" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise UserError(f"model.quantize_base fp8 needs a GPU of compute capability 8.9 or more (this one: "
                        f"{major}.{minor}); use int8 or nf4")
