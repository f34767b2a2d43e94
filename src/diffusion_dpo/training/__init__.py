"""Training, split by job:

    setup        the accelerator and engine checks, the data (pairs or cache + precomputed reference), the model
                 with its adapters, reference and speed options
    step         the method: one micro-batch's Diffusion-DPO loss and metrics
    loop         the data order's share of this process, the update or its skip, metrics.jsonl, the progress bar
    outputs      checkpoints' weights, validation grids, final/ and its card
    trainer      `Trainer` (holds the pieces, runs the loop) and `train`
    checkpoint   checkpoint folders: atomic writes, `latest`, rotation, the run marker
    losses       the loss registry (dpo, ipo, hinge, cdpo, sft, kto, mapo and the safeguard)
    optim        optimizers and LR schedules; ema: the weight average; trackers; model_card

`Trainer` and `train` load on first use (PEP 562), so `training.losses` can be imported without accelerate.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion_dpo.training.trainer import Trainer, train

__all__ = ["Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'diffusion_dpo.training' has no attribute '{name}'")
    value = getattr(importlib.import_module("diffusion_dpo.training.trainer"), name)
    globals()[name] = value
    return value
