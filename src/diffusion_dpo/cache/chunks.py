"""Work written in chunks that a kill cannot half-write, for the cache build and the precomputed reference: a folder
whose plan (what its chunks were made with) decides whether an interrupted run's chunks are kept, and files written
whole (a temporary name, then a rename). Chunks never depend on the number of processes, so a build resumes on any."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

from diffusion_dpo.errors import UserError

PLAN = "plan.json"
T = TypeVar("T")


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
    _whole(folder / PLAN, lambda part: part.write_text(json.dumps(plan)))


def _whole(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(part)` to a temporary name beside `path`, then a rename: a kill leaves the file whole or absent."""
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)


def save_whole(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file written whole (`_whole`)."""
    from safetensors.torch import save_file

    _whole(path, lambda part: save_file({k: v.contiguous() for k, v in tensors.items()}, part, metadata=metadata))


def save_arrays_whole(arrays: dict[str, np.ndarray], path: Path) -> None:
    """A numpy .npz file written whole (`_whole`; np.savez given a file object adds no suffix)."""
    def write(part: Path) -> None:
        with open(part, "wb") as f:
            np.savez(f, **arrays)

    _whole(path, write)


class ChunkWriter:
    """Rows of tensors collected for chunk after chunk, each written whole (`save_whole`) when its last row arrives.
    The batches that feed it must never straddle two chunks (the callers cut their batches within chunks, so the
    batches, and so the results, are those of one pass whichever process computes a chunk)."""

    def __init__(self, sizes: Sequence[int], paths: Sequence[Path]):
        self.sizes, self.paths = list(sizes), list(paths)
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.held, self.at = 0, 0  # rows collected of chunk `at`

    def add(self, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            self.parts.setdefault(name, []).append(t)
        self.held += len(next(iter(tensors.values())))
        if self.held == self.sizes[self.at]:
            save_whole({name: torch.cat(ts) for name, ts in self.parts.items()}, self.paths[self.at])
            self.parts, self.held, self.at = {}, 0, self.at + 1


def written(work: Callable[[], T], target: str, kept: Path, command: str) -> T:
    """`work()`, with a failed write (disk full, permissions) as one line saying where the finished chunks wait."""
    try:
        return work()
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}; finished chunks are kept in {kept} and reused "
                        f"by the next `{command}`") from None
