"""Measurements: a training run's metrics.jsonl read back (its lines, and a summary over the last steps: the demo's
report, its tuning loop and iterate's rounds summarise runs alike), and memory (this process's resident set, and the
peak since a reset: CUDA's allocator peak or the CPU's high-water mark), as `bench` and the losses demo report it."""

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


# ---------------------------------------------------------------- memory (torch is imported late: reading metrics
# needs none)

def _proc_status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS: now, VmHWM: the peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _proc_status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a worker would report
    # its parent's peak (the parent built the cache with the VAE and text encoders loaded)
    return _proc_status_bytes("VmHWM")


def reset_peak_memory() -> None:
    """Start a new peak from what is allocated now (CUDA), or resident now (CPU: VmHWM, reset by writing 5 to
    /proc/self/clear_refs, Linux >= 4.0; where that is refused, the peak keeps counting from the start)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(baseline: int) -> int:
    """The peak since the last reset: CUDA's max_memory_allocated, or the CPU's peak RSS above `baseline`."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return _peak_rss_bytes() - baseline
