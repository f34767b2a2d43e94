"""An exponential moving average of the trainable weights (`train.ema_decay`), kept beside the run.

After every optimizer update that changed the weights θ, the average θ̄ follows them:

    θ̄ ← d_n θ̄ + (1 - d_n) θ    at the n-th update,    d_1 = 0,    d_n = min(ema_decay, n / (n + 9)),

(diffusers' `EMAModel` does the arithmetic). d_1 = 0 makes the first update replace θ̄ outright, and the cap
n/(n + 9) keeps the early updates from being swamped by the starting weights; it passes 0.99 only after 891
updates, so on a short run the average spans fewer steps than 1/(1 - ema_decay). It costs one more fp32 copy of
the trainable weights. final/ and the validation grids hold θ̄; checkpoints hold θ (which training continues from)
and θ̄ (`ema.safetensors`, with the count of updates in `ema.json`), so a resumed run averages exactly as an
uninterrupted one. Only trainable weights are averaged: the full denoiser, or the LoRA adapters.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

from diffusion_dpo.errors import UserError

WEIGHTS_FILE = "ema.safetensors"
STATE_FILE = "ema.json"


class WeightAverage:
    """θ̄ for `params` (the trainable parameters, in the order the optimizer holds them)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.ema = EMAModel(self.params, decay=decay, foreach=True)

    @property
    def updates(self) -> int:
        return self.ema.optimization_step

    def update(self) -> None:
        """Fold the current weights into the average (after an optimizer update)."""
        self.ema.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds θ̄ inside the block and θ again after it (to sample or save the average)."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self, directory: Path) -> None:
        """θ̄ and the update count into a checkpoint directory."""
        from safetensors.torch import save_file

        save_file({f"{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)},
                  directory / WEIGHTS_FILE)
        (directory / STATE_FILE).write_text(json.dumps({"updates": self.updates, "decay": self.ema.decay}))

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote; a checkpoint of a run without an average, or of another model, is refused."""
        from safetensors.torch import load_file

        path = directory / WEIGHTS_FILE
        if not path.is_file() or not (directory / STATE_FILE).is_file():
            raise UserError(f"train.resume: {directory} holds no weight average ({WEIGHTS_FILE}): it was written "
                            "without train.ema_decay; resume it with train.ema_decay 0")
        tensors = load_file(path)
        shadows = self.ema.shadow_params
        if len(tensors) != len(shadows) or any(tensors[f"{i:05d}"].shape != s.shape for i, s in enumerate(shadows)):
            raise UserError(f"train.resume: {path} does not fit this run's trainable weights")
        for i, shadow in enumerate(shadows):
            shadow.copy_(tensors[f"{i:05d}"].to(shadow.device, shadow.dtype))
        self.ema.optimization_step = int(json.loads((directory / STATE_FILE).read_text())["updates"])
