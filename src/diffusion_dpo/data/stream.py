"""Preference pairs read as a stream (`data.streaming`): nothing is downloaded, copied, scanned or decoded before
the first step, and a resume continues at the exact row.

The source is a hub data set (`datasets.load_dataset(id, streaming=True)` at the pinned commit) or local parquet
shards read the same way. Each process reads its own shards (`datasets.distributed.split_dataset_by_node`), each
DataLoader worker its own shards of those (datasets splits them among the workers).

Order. Rows are read in blocks of `data.shuffle_buffer`; block b of epoch e is permuted by a generator seeded with
(train.seed, process, worker, e, b), and each item's augmentation, noise and timestep come from a seed of the same
numbers and its position, so the stream is a function of the seed and the layout. Epochs after the first read the
shards in another order (datasets' `set_epoch`). datasets' own shuffle buffer is not used: its content is lost on a
resume (its documentation says so); a block is re-read instead. A process that runs out of shards starts its next
epoch at once, so processes never wait for one another at an epoch's end.

Resume. A worker's state is (epoch, block, the source's state at the block's start, positions of the block already
used): a resume re-reads that block (bytes only) and skips the used positions. torchdata's `StatefulDataLoader`
collects the workers' states as of the last batch the loop took, and every process's goes into the checkpoint
(`loader_state.json`). The same processes, batch size, workers and block size continue exactly; another layout is
refused in one line (`training.loop.check_stream_layout`).

Rows are checked as they are met, as the up-front check checks them (`data.pairs`): a null caption, a label that
is not 0, 0.5 or 1 (label_1 = 1 - label_0 when present), an image cell without bytes, an image that does not decode.
A bad row is skipped and counted (metrics: bad_pairs_skipped), never a crash mid-run; ties are dropped unless
`data.keep_ties`.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.images import cell_problem, image_source, load_rgb
from diffusion_dpo.data.items import build_item
from diffusion_dpo.data.pairs import LABEL_TOL, REQUIRED_COLUMNS, check_schema, parquet_files
from diffusion_dpo.errors import UserError, is_local_path


@dataclass
class StreamSource:
    """This process's shards of a streamed data set (a `datasets.IterableDataset`, images left encoded)."""

    name: str  # data.path, for messages
    dataset: Any  # datasets.IterableDataset, already split for this process
    num_shards: int  # shards of the whole data set
    processes: int

    images_per_item = 2

    def summary(self) -> str:
        if self.processes == 1:
            split = ""
        elif self.num_shards % self.processes == 0:
            split = f", each of {self.processes} processes reads {self.num_shards // self.processes}"
        else:
            split = (f"; {self.num_shards} is not a multiple of {self.processes} processes, so each process reads "
                     f"every shard and keeps one row in {self.processes}")
        return (f"{self.name}: streamed, {self.num_shards} shard(s){split}; nothing read ahead, rows checked as met "
                "(bad rows skipped and counted)")


def open_stream(cfg: DataConfig, rank: int, world: int) -> StreamSource:
    """The streamed data set of `cfg.data.path` (local parquet file or directory, or a hub id), its schema checked
    (from the parquet footers: no row is read), its image columns left encoded, this process's shards."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    spec = cfg.path
    path = Path(spec).expanduser()
    if path.exists():
        files = [path] if path.is_file() else parquet_files(path, cfg.split)
        if not files or any(f.suffix != ".parquet" for f in files):
            raise UserError(f"data.streaming: '{spec}' is not parquet (it streams parquet shards or a hub data set); "
                            "leave data.streaming off for this data")
        loaded = _attempt(spec, lambda: datasets.load_dataset(
            "parquet", data_files={"train": [str(f) for f in files]}, split="train", streaming=True))
    elif is_local_path(spec):
        raise UserError(f"data.path '{spec}' does not exist")
    else:
        loaded = _attempt(spec, lambda: datasets.load_dataset(spec, split=cfg.split, revision=cfg.revision,
                                                              streaming=True))
    features = loaded.features
    if features is None:  # a format whose schema is only known from its first rows
        features = _attempt(spec, lambda: loaded._resolve_features().features)
    check_schema(features.arrow_schema, spec)
    ds = loaded
    for name in ("jpg_0", "jpg_1"):  # keep encoded bytes: decoding happens in our workers
        if isinstance(features.get(name), datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    ds = ds.select_columns([c for c in (*REQUIRED_COLUMNS, "label_1") if c in features])
    num_shards = ds.num_shards
    if world > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    return StreamSource(name=spec, dataset=ds, num_shards=num_shards, processes=world)


def _attempt(spec: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no such split, unreadable file
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise UserError(f"data.path '{spec}' could not be streamed: {reason}") from None


class BadRow(ValueError):
    """A streamed row that cannot be a training pair (its problem is the message)."""


def row_pair(rec: dict) -> tuple[str, bytes, bytes, float]:
    """(caption, winner bytes, loser bytes, label) of a Pick-a-Pic row; label 0.5 is a tie. Raises `BadRow`."""
    caption = rec.get("caption")
    if caption is None:
        raise BadRow("caption is null")
    l0 = rec.get("label_0")
    if l0 is None or (isinstance(l0, float) and math.isnan(l0)):
        raise BadRow("label_0 is null or NaN")
    l0 = float(l0)
    label = next((v for v in (0.0, 0.5, 1.0) if abs(l0 - v) <= LABEL_TOL), None)
    if label is None:
        raise BadRow(f"label_0 is {l0:g}, expected 0, 0.5 or 1")
    l1 = rec.get("label_1", 1.0 - l0)
    if l1 is None or not abs(float(l1) - (1.0 - l0)) <= LABEL_TOL:
        raise BadRow(f"label_1 is {l1} but label_0 is {l0:g} (label_1 must be 1 - label_0)")
    cells = []
    for name in ("jpg_0", "jpg_1"):
        problem = cell_problem(rec.get(name))
        if problem:
            raise BadRow(f"{name} {problem}")
        cells.append(image_source(rec[name]))
    first, second = cells
    return (caption, second, first, 1.0) if label == 0.0 else (caption, first, second, 1.0 if label == 1.0 else 0.5)


class StreamedPairs(torch.utils.data.IterableDataset):
    """Training items of a `StreamSource`, endlessly (epoch after epoch), resumable through `state_dict`.

    Items are those of `data.items.build_item`, plus `stream_epoch` (the epoch they belong to)."""

    def __init__(self, source: StreamSource, cfg: DataConfig, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                 seed: int, rank: int):
        self.source, self.cfg, self.tokenize = source, cfg, tokenize
        self.seed, self.rank = seed % 2**64, rank
        self._state: dict = {"epoch": 0, "block": 0, "start": None, "taken": 0}
        self._resume: Optional[dict] = None

    def state_dict(self) -> dict:
        """Where this worker is: the state as of the last item it yielded (JSON-able)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue, at the next iteration, after the item `state` was taken at."""
        self._resume = copy.deepcopy(state)
        self._state = copy.deepcopy(state)

    def _block_order(self, worker: int, epoch: int, block: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 3, self.rank, worker, epoch, block]).permutation(n)

    def _sample_seed(self, worker: int, epoch: int, block: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, 2, self.rank, worker, epoch, block, position])
                   .generate_state(1, np.uint64)[0])

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        resume, self._resume = self._resume, None
        epoch, block, start, taken = ((resume["epoch"], resume["block"], resume["start"], resume["taken"])
                                      if resume else (0, 0, None, 0))
        skipped = 0  # bad rows met since the last item (counted with the next one)
        while True:
            ds = copy.deepcopy(self.source.dataset)
            ds.set_epoch(epoch)
            if start is not None:
                ds.load_state_dict(start)
            rows, read, used = iter(ds), 0, 0
            while True:
                buffer = list(itertools.islice(rows, self.cfg.shuffle_buffer))
                if not buffer:
                    break
                read += len(buffer)
                after = ds.state_dict()  # where the next block starts
                order = self._block_order(worker, epoch, block, len(buffer))
                for position in range(taken, len(buffer)):
                    item = self._item(buffer[order[position]], self._sample_seed(worker, epoch, block, position))
                    if item is None:
                        continue  # a tie, dropped
                    if isinstance(item, BadRow):
                        skipped += 1
                        continue
                    item["bad_pairs_skipped"], item["stream_epoch"], skipped = skipped, epoch, 0
                    used += 1
                    self._state = {"epoch": epoch, "block": block, "start": start, "taken": position + 1}
                    yield item
                block, start, taken = block + 1, after, 0
            if read == 0 and resume is None:
                return  # this worker has no shard (more workers than shards): the others go on
            if used == 0 and resume is None:
                raise UserError(f"{self.source.name}: {read} streamed rows and not one usable pair "
                                "(ties dropped, bad rows skipped)")
            epoch, block, start, taken, resume = epoch + 1, 0, None, 0, None

    def _item(self, rec: dict, seed: int) -> Optional[dict | BadRow]:
        """The training item of row `rec`, None for a dropped tie, the `BadRow` for a bad one."""
        try:
            caption, winner, loser, label = row_pair(rec)
            if label == 0.5 and not self.cfg.keep_ties:
                return None
            images = [load_rgb(winner), load_rgb(loser)]
        except BadRow as bad:
            return bad
        except Exception as exc:  # noqa: BLE001 - an image that does not decode is a bad row
            return BadRow(f"image cannot be decoded ({type(exc).__name__})")
        return build_item(caption, images, label, seed, self.cfg, self.tokenize)
