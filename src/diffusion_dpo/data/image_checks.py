"""The image check before training (`data.image_check before`), split over processes and remembered.

Every image of every used pair is decoded once before any model loads, so a broken file stops the run in one line
(or, with `data.skip_bad_rows`, is dropped and counted). Two things keep that cheap at Pick-a-Pic's 1.7M images:

- **Split.** Inside `shared_by(state)` (the trainer's processes), each process decodes its share of the rows not yet
  known (every `world`-th), and the results are gathered, so N processes take ~1/N of the time and none waits long.
- **Remembered.** The result of every checked row is kept in a file under the user's cache
  (`$DIFFUSION_DPO_CACHE`, default `~/.cache/diffusion_dpo`, in `image-checks/`), keyed by a 64-bit key per row that
  changes when the row's images change: for a table, the data file's path, size and modification time and the
  row's place in it; for JSONL/CSV, each image file's path, size and modification time. A repeated or resumed start
  on unchanged files decodes nothing; a changed file is checked again. The file is named by what decides a
  verdict (the accepted formats and the pixel limit), so a change there checks everything again.

With `data.image_check lazy` nothing is decoded before training: a pair whose image does not decode is replaced,
when the loader meets it, by the next pair of the data (counted, and reported per step as `bad_pairs_skipped`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from diffusion_dpo.data import images as image_module
from diffusion_dpo.data.row_keys import digest64
from diffusion_dpo.processes import decide_once

CHECK_VERSION = 1  # bump when what makes an image bad changes in a way the name below does not capture
_SHARED: contextvars.ContextVar[Any] = contextvars.ContextVar("image_check_processes", default=None)


@contextlib.contextmanager
def shared_by(state: Any) -> Iterator[None]:
    """Within this block, image checks are split over the processes of `state` (an accelerate state); every process
    must then load the same data inside such a block."""
    token = _SHARED.set(state if state is not None and state.num_processes > 1 else None)
    try:
        yield
    finally:
        _SHARED.reset(token)


def cache_root() -> Path:
    """Where remembered checks live: $DIFFUSION_DPO_CACHE, else ~/.cache/diffusion_dpo."""
    return Path(os.environ.get("DIFFUSION_DPO_CACHE") or Path.home() / ".cache" / "diffusion_dpo")


class Memory:
    """Checked rows' verdicts for one data source: sorted 64-bit keys, each with a code (0: fine; k: the k-th of the
    distinct problems), so Pick-a-Pic's 1.7M rows take ~20 MB."""

    def __init__(self, path: Path):
        self.path = path
        self.keys = np.zeros(0, np.uint64)
        self.codes = np.zeros(0, np.int32)
        self.problems: list[str] = []
        try:
            with np.load(path, allow_pickle=False) as saved:
                keys, codes, problems = saved["keys"], saved["codes"], [str(p) for p in saved["problems"]]
            if len(keys) == len(codes) and (not len(codes) or int(codes.max()) <= len(problems)):
                self.keys, self.codes, self.problems = keys, codes, problems
        except (OSError, ValueError, KeyError):  # none yet, or unreadable: check again
            pass

    @classmethod
    def of(cls, source: str) -> "Memory":
        # named by the source and by what decides a verdict: another pixel limit or format list checks again
        name = digest64("\0".join(map(str, (source, CHECK_VERSION, image_module.IMAGE_FORMATS,
                                             image_module.MAX_IMAGE_PIXELS))))
        return cls(cache_root() / "image-checks" / f"{name:016x}.npz")

    def lookup(self, keys: np.ndarray) -> list[Optional[str]]:
        """For each key: None (never checked), "" (fine) or its problem."""
        if not len(self.keys):
            return [None] * len(keys)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[at] == keys
        texts = [""] + self.problems
        return [texts[int(self.codes[i])] if ok else None for i, ok in zip(at, found)]

    def add(self, keys: np.ndarray, problems: Sequence[str]) -> None:
        """Remember these verdicts (a key seen again takes the new one) and write the file (atomically)."""
        if not len(keys):
            return
        index = {p: k + 1 for k, p in enumerate(self.problems)}
        codes = np.array([index.setdefault(p, len(index) + 1) if p else 0 for p in problems], np.int32)
        self.problems = sorted(index, key=index.get)
        keys = np.asarray(keys, np.uint64)
        old = ~np.isin(self.keys, keys)  # verdicts not replaced by the new ones
        all_keys = np.concatenate([self.keys[old], keys])
        all_codes = np.concatenate([self.codes[old], codes])
        order = np.argsort(all_keys, kind="stable")
        self.keys, self.codes = all_keys[order], all_codes[order]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, keys=self.keys, codes=self.codes, problems=np.array(self.problems, dtype=str))
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: the check still happened, it is only not remembered
            pass


def check_images(reader: Any, rows: np.ndarray, num_workers: int, stop_at_first: bool,
                 source: str) -> list[tuple[int, str]]:
    """[(row, problem)] in row order for the `rows` (ascending) whose images do not decode, as
    `images.find_bad_images` finds them, but decoding only rows not remembered, split over the processes of the
    enclosing `shared_by` block. With `stop_at_first`, the first bad row in row order is among those returned."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return []
    state = _SHARED.get()
    keys = reader.row_keys(rows)
    # what is remembered is the main process's (another node's cache may hold another file or none): sent to all, so
    # that every process splits the same rows and ends with the same verdicts
    memory = Memory.of(source) if state is None or state.is_main_process else None
    known = memory.lookup(keys) if state is None else decide_once(state, lambda: memory.lookup(keys))
    bad = [(int(r), p) for r, p in zip(rows, known) if p]
    todo = np.array([i for i, p in enumerate(known) if p is None], np.int64)
    if stop_at_first and bad:  # rows after the first remembered bad one need no decoding to report it
        todo = todo[rows[todo] < bad[0][0]]
    share = todo if state is None else todo[state.process_index::state.num_processes]
    found, checked = image_module.find_bad_images(reader, rows[share], num_workers, stop_at_first)
    results = [(share[:checked].tolist(), found)]
    if state is not None:
        from accelerate.utils import gather_object

        results = gather_object(results)
    new_keys, new_problems = [], []
    for done, found in results:
        problems = {row: p for row, p in found}
        for i in done:
            new_keys.append(keys[i])
            new_problems.append(problems.get(int(rows[i]), ""))
        bad += found
    if memory is not None:
        memory.add(np.array(new_keys, np.uint64), new_problems)
    return sorted(bad)
