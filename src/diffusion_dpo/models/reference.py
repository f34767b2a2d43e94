"""The frozen reference model of DPO: a separate frozen copy (full fine-tune) or the same denoiser with its LoRA
adapters disabled (no second copy in memory). Family-neutral: it only copies, casts and toggles adapters.

    with torch.no_grad(), reference.model(policy) as ref:
        ref_err = family.mse(ref, ...)
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch import nn

from diffusion_dpo.models.precision import cast


class Reference:
    """The frozen reference model: a separate frozen copy (full fine-tune) or the same denoiser with its
    LoRA adapters disabled (no second copy in memory)."""

    def __init__(self, policy: nn.Module, lora: bool, dtype: torch.dtype):
        self.policy = policy
        self.lora = lora
        self.copy: Optional[nn.Module] = None
        if not lora:
            self.copy = cast(copy.deepcopy(policy).requires_grad_(False).eval(), dtype)

    @contextlib.contextmanager
    def model(self, policy: Optional[nn.Module] = None) -> Iterator[nn.Module]:
        """`with reference.model(unwrapped) as ref: ref(...)` under no_grad; restores adapters afterwards."""
        model = policy if policy is not None else self.policy
        if self.copy is not None:
            # Same mode as the policy: some diffusers blocks take another (numerically different) path in
            # train mode (ResnetBlock2D's .contiguous()); then θ = ref would not give exactly log 2.
            # SD UNets and the SD3/FLUX transformers have no dropout: train mode keeps the reference
            # deterministic.
            self.copy.train(model.training)
            yield self.copy
            return
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
