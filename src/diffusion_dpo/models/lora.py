"""LoRA on any family's denoiser (peft through diffusers' PeftAdapterMixin): attach, and export in the naming
that the family's pipeline `load_lora_weights` reads.

LoRA's B matrices start at zero, so the adapted denoiser equals the base at step 0 (loss = log 2). The reference
of a LoRA run is the same denoiser with its adapters disabled (models.reference).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from diffusion_dpo.config import LoraConfig
from diffusion_dpo.errors import UserError


def lora_targets(cfg: LoraConfig, family_default: Sequence[str]) -> list[str]:
    """`lora.target_modules`, or the family's default when it is not set."""
    return list(cfg.target_modules) if cfg.target_modules is not None else list(family_default)


def add_lora(denoiser: nn.Module, cfg: LoraConfig, family_default: Sequence[str]) -> list[nn.Parameter]:
    """Freeze the denoiser and attach a peft LoRA adapter to the target modules; return the trainable params."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora_targets(cfg, family_default)
    denoiser.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              lora_dropout=cfg.dropout, init_lora_weights="gaussian", target_modules=targets)
    try:
        denoiser.add_adapter(peft_cfg)
    except ValueError as exc:
        raise UserError(f"lora.target_modules {targets}: {str(exc).splitlines()[0]}") from None
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the base is fp16/bf16
    return params


def lora_state_dict(denoiser: nn.Module, diffusers_naming: bool) -> tuple[dict[str, Tensor], dict]:
    """The adapter's weights and its peft config (saved as metadata so alpha survives).

    `diffusers_naming`: convert peft's names to diffusers' older LoRA naming (what diffusers' SD/SDXL training
    scripts save for a UNet). The transformer families keep peft's names, as diffusers' SD3/FLUX scripts save
    them: the conversion knows only some of an MMDiT's projections (to_q but not add_q_proj), and a file with
    both namings loads only in part."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    if diffusers_naming:
        state = convert_state_dict_to_diffusers(state)
    metadata = denoiser.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, metadata
