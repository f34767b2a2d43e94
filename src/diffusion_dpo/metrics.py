"""A training run's metrics.jsonl read back: its lines, and a summary over the last steps (the demo's report, its
tuning loop and iterate's rounds summarise runs alike)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np


def read_metrics(run_dir: Path) -> list[dict]:
    """One dict per optimizer step, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def training_summary(rows: list[dict]) -> dict:
    """Means over the last 10% of steps (single steps are noisy at small batches), and the median pairs/s."""
    tail = rows[-max(1, len(rows) // 10):]
    keys = ("loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l")

    def mean(k: str) -> Optional[float]:  # a metric a run did not compute (SFT's loser errors) is null throughout
        values = [r[k] for r in tail if r.get(k) is not None]
        return float(np.mean(values)) if values else None

    return {"steps": len(rows), **{f"final_{k}": mean(k) for k in keys},
            "pairs_per_s": float(np.median([r["pairs_per_s"] for r in rows]))}
