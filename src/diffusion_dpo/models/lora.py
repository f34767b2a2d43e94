"""LoRA on any family's denoiser (peft through diffusers' PeftAdapterMixin): attach, and export in the naming
that the family's pipeline `load_lora_weights` reads.

LoRA's B matrices start at zero, so the adapted denoiser equals the base at step 0 (loss = log 2). The reference
of a LoRA run is the same denoiser with its adapters disabled (models.reference).

A run may instead continue from LoRA weights it (or an earlier run) saved (`lora.init_from`, `iterate`'s rounds):
`read_lora_file` reads the exported file back into peft's naming and `load_adapter` puts it into a named adapter.
The reference of such a run is, by default, its own starting point: a second, frozen adapter "reference" holding
the same weights (`add_frozen_adapter`), so the policy again equals the reference at step 0, at no memory cost
beyond a second set of adapter weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor, nn

from diffusion_dpo.config import LoraConfig
from diffusion_dpo.errors import UserError


LORA_FILE = "pytorch_lora_weights.safetensors"  # what the pipelines' save_lora_weights writes and load_lora_weights reads
REFERENCE_ADAPTER = "reference"


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


def lora_file(path: str, setting: str = "lora.init_from") -> Path:
    """The weights file of a LoRA output: a directory holding pytorch_lora_weights.safetensors, or the file."""
    given = Path(path).expanduser()
    file = given / LORA_FILE if given.is_dir() else given
    if not file.is_file():
        raise UserError(f"{setting} '{path}': no {LORA_FILE} there (expected a LoRA run's final/ or that file)")
    return file


def read_lora_file(path: str, role: str, diffusers_naming: bool, setting: str = "lora.init_from") -> dict[str, Tensor]:
    """The denoiser's adapter weights from a file `Family.save_lora` wrote, in peft's naming (no adapter name):
    the inverse of `lora_state_dict` plus the pipeline's "<role>." prefix."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    file = lora_file(path, setting)
    try:
        state = load_file(file)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{setting} '{path}': not a readable safetensors file ({type(exc).__name__})") from None
    prefix = f"{role}."
    own = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    if not own:
        found = sorted({k.split(".", 1)[0] for k in state})
        raise UserError(f"{setting} '{path}': holds no {role} weights (its keys start with {', '.join(found[:3])}; "
                        "a LoRA made for another model family?)")
    return convert_unet_state_dict_to_peft(own) if diffusers_naming else own


def saved_alpha(path: str, role: str) -> Optional[float]:
    """The lora_alpha the adapters in the LoRA output `path` were trained with (the adapter metadata diffusers'
    `save_lora_weights` writes), or None where the file records none."""
    from safetensors import safe_open

    try:
        with safe_open(str(lora_file(path)), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    except (OSError, ValueError, json.JSONDecodeError):  # read_lora_file reports an unreadable file, in one line
        return None
    alpha = metadata.get(f"{role}.lora_alpha")
    return float(alpha) if alpha is not None else None


def with_saved_alpha(cfg: LoraConfig, role: str) -> LoraConfig:
    """`cfg` continuing `cfg.init_from`'s adapters at the scale they were trained with: lora.alpha unset takes their
    alpha, and another one is refused in one line. The continued policy and its reference (those adapters, frozen)
    must be the saved model; with another alpha both would silently scale the adapters differently (alpha / rank)."""
    if cfg.rank == 0 or not cfg.init_from:
        return cfg
    saved = saved_alpha(cfg.init_from, role)
    if saved is None:
        return cfg
    if cfg.alpha is None:
        return replace(cfg, alpha=saved)
    if float(cfg.alpha) != saved:
        raise UserError(f"lora.alpha {cfg.alpha:g}: the adapters in lora.init_from '{cfg.init_from}' were trained with "
                        f"alpha {saved:g}, and another scale would not continue the saved model; leave lora.alpha "
                        "unset to take theirs")
    return cfg


def load_adapter(denoiser: nn.Module, state: dict[str, Tensor], adapter_name: str, setting: str) -> None:
    """Copy `state` (peft naming) into the denoiser's adapter `adapter_name`; every one of that adapter's weights
    must be given, with its shape (another rank or other target modules is a one-line error)."""
    from peft.utils import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    except RuntimeError as exc:  # size mismatch: another rank
        raise UserError(f"{setting}: its weights do not fit lora.rank/target modules "
                        f"({str(exc).strip().splitlines()[-1].strip()[:160]})") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        what = f"has {unexpected[0]}, which" if unexpected else f"lacks {missing[0]}, which"
        raise UserError(f"{setting}: its weights do not fit lora.target_modules (it {what} this run's adapters "
                        f"{'do not have' if unexpected else 'need'})")


def add_frozen_adapter(denoiser: nn.Module, cfg: LoraConfig, family_default: Sequence[str],
                       state: dict[str, Tensor], setting: str) -> None:
    """A second adapter, REFERENCE_ADAPTER, holding `state` in fp32 (as the trained one), without dropout, frozen;
    the trained adapter ("default") stays the active one."""
    from peft import LoraConfig as PeftLoraConfig

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                              lora_dropout=0.0, init_lora_weights="gaussian",
                              target_modules=lora_targets(cfg, family_default))
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: here that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        denoiser.add_adapter(peft_cfg, adapter_name=REFERENCE_ADAPTER)  # diffusers makes the new adapter active
    denoiser.set_adapter("default")  # ... so make the trained one active again (and the only trainable one)
    frozen = [p for n, p in denoiser.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
    for p in frozen:
        p.data = p.data.float()
        p.requires_grad_(False)
    load_adapter(denoiser, state, REFERENCE_ADAPTER, setting)


def active_adapter(denoiser: nn.Module, name: str) -> None:
    """Make adapter `name` the one every LoRA layer applies (peft's per-layer switch; it also sets requires_grad
    to the active adapter, so the trained adapter must be switched back before a backward pass)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(name)



def continue_adapters(denoiser: nn.Module, cfg: LoraConfig, role: str, diffusers_naming: bool) -> dict[str, Tensor]:
    """Load `cfg.init_from` into the trained adapter ("default", attached by `add_lora`); return the weights."""
    state = read_lora_file(cfg.init_from, role, diffusers_naming)
    load_adapter(denoiser, state, "default", f"lora.init_from '{cfg.init_from}'")
    return state
