"""Optimizers and learning-rate schedules named in the config.

AdamW is the paper's choice for SD1.5; Adafactor (no momentum, factored second moments) is what
made the full SDXL fine-tune fit in memory; 8-bit AdamW (bitsandbytes) is a middle ground.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from diffusion_dpo.config import OptimConfig
from diffusion_dpo.errors import UserError


def make_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Build the optimizer `cfg.name` over `params` at learning rate `lr` (already scaled if asked)."""
    params = list(params)
    if cfg.name == "adamw":
        # One fused kernel over all parameters (CUDA and, since torch 2.4, CPU): on the tiny model's 0.8M
        # parameters it is 4.6x faster than torch's CPU default (a Python loop per tensor) and 3x faster
        # than foreach. Other devices keep torch's default.
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                   weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed external learning rate (as the official SDXL run), not Adafactor's relative step size
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name: unknown optimizer '{cfg.name}' (adamw, adamw8bit, adafactor)")


def make_lr_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    """The LR schedule `cfg.lr_scheduler` with `cfg.lr_warmup_steps` of linear warm-up, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max_steps)
