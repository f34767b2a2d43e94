"""Sample diversity of a generation run: how different a prompt's images are across seeds.

    diversity = mean over prompts p of  mean over seed pairs (s, s') of  RMS(x_ps - x_ps')

with grey-level pixels in [0, 1]. A model that collapses onto one image per prompt scores 0; it is read as a ratio
to the base model's on the same prompts and seeds (DPO trades some diversity for reward; a ratio far below 1 is
mode collapse, the usual sign of over-optimisation in on-policy rounds).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np


def diversity(run_dir: str | Path) -> float:
    """The run's diversity (above); NaN when no prompt has two seeds."""
    from diffusion_dpo.evaluation.compare import load_run, run_image

    run_dir = Path(run_dir)
    by_prompt: dict[int, list[np.ndarray]] = {}
    for row in load_run(run_dir):
        grey = run_image(run_dir, row["file"]).convert("L")  # the safe decoder, a one-line error on a bad image
        by_prompt.setdefault(row["prompt_index"], []).append(np.asarray(grey, np.float64) / 255.0)
    per_prompt = [np.mean([np.sqrt(np.mean((a - b) ** 2)) for a, b in combinations(images, 2)])
                  for images in by_prompt.values() if len(images) > 1]
    return float(np.mean(per_prompt)) if per_prompt else float("nan")
