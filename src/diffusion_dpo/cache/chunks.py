"""Work written in chunks that a kill cannot half-write, for the cache build and the precomputed reference: a folder
whose plan (what its chunks were made with) decides whether an interrupted run's chunks are kept, and files written
whole (a temporary name, then a rename). Chunks never depend on the number of processes, so a build resumes on any."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

PLAN = "plan.json"


def chunk(index: int, size: int, total: int) -> range:
    """Items of chunk `index` of `size` items among `total`."""
    return range(index * size, min((index + 1) * size, total))


def num_chunks(size: int, total: int) -> int:
    return -(-total // size)


def open_plan(folder: Path, plan: dict, what: str, log: Any) -> None:
    """Keep the chunks of an interrupted run of the same `plan` in `folder`; otherwise start `folder` afresh."""
    try:
        saved = json.loads((folder / PLAN).read_text()) if (folder / PLAN).is_file() else None
    except json.JSONDecodeError:
        saved = None
    if saved == plan:
        done = sum(1 for f in folder.iterdir() if f.name != PLAN and not f.name.endswith(".part"))
        log(f"{what}: resuming the interrupted run in {folder} ({done} chunk files already written)")
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_whole(folder / PLAN, json.dumps(plan).encode())


def write_whole(path: Path, data: bytes) -> None:
    """`data` written under a temporary name, then renamed: a kill leaves the file whole or absent."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def save_whole(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file written under a temporary name, then renamed: a kill leaves it whole or absent."""
    from safetensors.torch import save_file

    part = path.with_name(path.name + ".part")
    save_file({k: v.contiguous() for k, v in tensors.items()}, part, metadata=metadata)
    os.replace(part, path)


def save_arrays_whole(arrays: dict[str, np.ndarray], path: Path) -> None:
    """A numpy .npz file written whole (see `save_whole`)."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        np.savez(f, **arrays)
    os.replace(part, path)
