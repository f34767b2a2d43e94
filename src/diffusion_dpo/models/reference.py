"""The frozen reference model of DPO, in one of four forms (family-neutral: it only copies, casts and switches
adapters):

    a frozen copy of the policy's starting weights   full fine-tune (default)
    a frozen denoiser loaded from elsewhere          `model.reference` (e.g. the base while training round r)
    the same denoiser, adapters disabled             LoRA (default; no second copy in memory)
    the same denoiser, the frozen adapter active     LoRA continued from `lora.init_from` (models.lora)

    with torch.no_grad(), reference.model(policy) as ref:
        ref_err = family.mse(ref, ...)
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from diffusion_dpo.config import LoraConfig, ModelConfig
from diffusion_dpo.models.precision import cast

if TYPE_CHECKING:
    from diffusion_dpo.models.family import Family


class Reference:
    """The frozen reference model (see the module docstring): `frozen` a denoiser to use as it is, else a copy
    of the policy (full fine-tune), the policy with adapter `adapter` active, or with its adapters disabled."""

    def __init__(self, policy: nn.Module, lora: bool, dtype: torch.dtype, frozen: Optional[nn.Module] = None,
                 adapter: Optional[str] = None):
        self.policy = policy
        self.lora = lora
        self.adapter = adapter
        self.copy: Optional[nn.Module] = None
        if frozen is not None:
            self.copy = cast(frozen.requires_grad_(False).eval(), dtype)
        elif not lora:
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
        if self.adapter is not None:
            from diffusion_dpo.models.lora import active_adapter

            active_adapter(model, self.adapter)
            try:
                yield model
            finally:
                active_adapter(model, "default")
            return
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()


def reference_kind(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> str:
    """Which form the reference takes (the table in the module docstring): "elsewhere" (model.reference's
    denoiser), "start_adapters" (LoRA continued from lora.init_from: those adapters, frozen) or "start" (the
    policy's starting weights: a frozen copy, or adapters off)."""
    from diffusion_dpo.models.loading import same_model

    if model_cfg.reference is not None and not same_model(model_cfg.reference, model_cfg.pretrained):
        return "elsewhere"
    if lora_cfg.rank > 0 and lora_cfg.init_from and model_cfg.reference is None:
        return "start_adapters"
    return "start"


def build_reference(policy: nn.Module, model_cfg: ModelConfig, lora_cfg: LoraConfig, family: "Family",
                    dtype: torch.dtype, device: torch.device | str,
                    init_state: Optional[dict[str, torch.Tensor]] = None) -> Reference:
    """The reference a run's settings ask for (`reference_kind`). `policy` is the denoiser as set up for training
    (adapters attached and, with lora.init_from, loaded: `init_state` is what was loaded)."""
    from diffusion_dpo.models.loading import load_reference_denoiser
    from diffusion_dpo.models.lora import REFERENCE_ADAPTER, add_frozen_adapter

    lora = lora_cfg.rank > 0
    kind = reference_kind(model_cfg, lora_cfg)
    if kind == "elsewhere":
        from diffusion_dpo.models.quantize import quantize_base

        reference = Reference(policy, lora, dtype, frozen=load_reference_denoiser(model_cfg, type(family), device))
        if lora:  # the reference's base in the same bits as the policy's (model.quantize_base)
            quantize_base(reference.copy, model_cfg.quantize_base, dtype)
        return reference
    if kind == "start_adapters":
        add_frozen_adapter(policy, lora_cfg, family.default_lora_targets, init_state,
                           f"lora.init_from '{lora_cfg.init_from}'")
        return Reference(policy, lora, dtype, adapter=REFERENCE_ADAPTER)
    return Reference(policy, lora, dtype)
