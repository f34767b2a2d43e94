"""The training loop's bookkeeping: this process's share of the data order, the micro-batches, the update or its
skip, the step's metrics averaged over processes and appended to metrics.jsonl, and the progress bar.

The data order comes from (train.seed, epoch) (`data.items.PairSampler`); each pair's augmentation, timestep,
noise and VAE sample from its own seed (seed, epoch, position), so a resumed run continues exactly and the split
of pairs over processes or accumulation micro-steps does not change what any pair sees.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from diffusion_dpo.config import DataConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.data.items import PairSampler, collate_packed, keys_per_epoch, unpack_batch
from diffusion_dpo.training.checkpoint import TrainState
from diffusion_dpo.training.step import METRIC_KEYS

NOT_ALWAYS_RUN = ("model_mse_l", "ref_mse_l")  # SFT on decided pairs never runs the model on the losers
MetricsCallback = Callable[[dict[str, Any]], None]


class ShardedPairSampler(torch.utils.data.Sampler):
    """This process's share of a `PairSampler`: of every global batch (batch_size x processes items),
    process r takes items [r*b, (r+1)*b). An incomplete last global batch is dropped."""

    def __init__(self, base: PairSampler, batch_size: int, rank: int, world: int):
        self.base, self.b, self.rank, self.world = base, batch_size, rank, world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        global_batch = self.b * self.world
        buffer = []
        for key in self.base:
            buffer.append(key)
            if len(buffer) == global_batch:
                yield from buffer[self.rank * self.b:(self.rank + 1) * self.b]
                buffer = []

    def __len__(self) -> int:
        return keys_per_epoch(len(self.base), self.b, self.world) // self.world


def micro_batches(dataset: torch.utils.data.Dataset, sampler: PairSampler, data: DataConfig, state: TrainState,
                  rank: int, world: int, pin_memory: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, micro-batch) forever, starting at the state's epoch and position.

    One DataLoader with persistent workers: the sampler runs in this process, so setting its epoch
    before each pass is enough; workers only decode the (pair, seed) keys they are sent."""
    sharded = ShardedPairSampler(sampler, data.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=data.batch_size, sampler=sharded, collate_fn=collate_packed,
        num_workers=data.num_workers, persistent_workers=data.num_workers > 0, drop_last=True, pin_memory=pin_memory)
    epoch, start = state.epoch, state.position
    while True:
        sampler.set_epoch(epoch, start=start)
        for batch in loader:
            yield epoch, unpack_batch(batch)
        epoch, start = epoch + 1, 0


class StreamBatches:
    """(epoch, micro-batch) of this process from a streamed data set (`data.stream.StreamedPairs`), forever, through
    torchdata's `StatefulDataLoader`, whose `state_dict` is where the loop is (as of the last batch taken, however
    far the workers have read ahead): saved in each checkpoint, loaded on resume."""

    def __init__(self, dataset: torch.utils.data.IterableDataset, data: DataConfig, pin_memory: bool,
                 state: Optional[dict] = None):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # torchdata 0.11 calls torch's deprecated set_vital on every iteration; nothing for our users to act on
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        self.loader = StatefulDataLoader(dataset, batch_size=data.batch_size, collate_fn=collate_packed,
                                         num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                                         pin_memory=pin_memory)
        if state is not None:
            self.loader.load_state_dict(state)
        self.name, self._batches = data.path, None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def close(self) -> None:
        """Stop reading (the workers, or the source's open files in this process)."""
        self._batches = None

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            batch = unpack_batch(next(self._batches))
        except StopIteration:  # every worker of this process had no shard to read
            raise UserError(f"data.path '{self.name}': this process's share of the stream is empty (fewer shards "
                            "than processes x data.num_workers?)") from None
        return int(batch.pop("stream_epoch").max()), batch


def stream_layout(processes: int, data: DataConfig) -> dict[str, int]:
    """What a streamed run's loader states depend on: which shards each process and worker reads, how rows are
    batched and permuted."""
    return {"processes": processes, "batch_size": data.batch_size, "num_workers": data.num_workers,
            "shuffle_buffer": data.shuffle_buffer}


def check_stream_layout(state: TrainState, layout: Optional[dict[str, int]], path: Any) -> None:
    """Refuse, in one line, a resume that cannot continue the same streams: a streamed checkpoint without streaming
    or the reverse, or a streamed one under another layout (`stream_layout`: each process's stream is its own
    shards, so another split would not continue at the same rows)."""
    if state.stream == layout:
        return
    if layout is None:
        raise UserError(f"train.resume: {path} was written by a streamed run; resume it with data.streaming true")
    if state.stream is None:
        raise UserError(f"train.resume: {path} was not written by a streamed run (its position counts the whole "
                        "data set's order); resume it with data.streaming false")
    changed = ", ".join(f"{k} {state.stream.get(k)} (now {v})" for k, v in layout.items() if state.stream.get(k) != v)
    raise UserError(f"train.resume: {path} streamed with {changed}; a stream continues only under the layout that "
                    "read it (each process and worker reads its own shards): resume with those settings")


def advance_position(state: TrainState, epoch: int, pairs: int) -> None:
    """Count one global micro-batch of `pairs` pairs (all processes) consumed in `epoch` (a new epoch starts at 0)."""
    if epoch != state.epoch:
        state.epoch, state.position = epoch, 0
    state.position += pairs


def layout_of(processes: int, batch_size: int, accumulation: int) -> dict[str, int]:
    """How a run consumes the order: per optimizer step, `accumulation` micro-batches of `batch_size` pairs on each
    of `processes` processes."""
    return {"processes": processes, "batch_size": batch_size, "accumulation": accumulation}


def continue_layout(state: TrainState, layout: dict[str, int], log: Callable[[str], None]) -> None:
    """Make a resumed `state` continue under this run's `layout`: at the same pair of the same global order.

    The order and each pair's seeds depend only on (train.seed, epoch, position), never on the layout, so another
    number of processes, batch size or accumulation continues at the same pair; an epoch then ends at the last
    whole global batch of the new layout. (Sharded engine states are refused on another number of processes
    before they are read: `outputs.Checkpoints.load`.) A checkpoint written before layouts were recorded counted
    global micro-batches of this layout (the only one it could resume on)."""
    if state.layout is None:
        state.position *= layout["batch_size"] * layout["processes"]
    elif state.layout != layout:
        log(f"train.resume: written by {_says(state.layout)}, continued by {_says(layout)}: at pair {state.position} "
            f"of epoch {state.epoch} in the same order")
    state.layout = dict(layout)


def _says(layout: dict[str, int]) -> str:
    return (f"{layout['processes']} process(es) x batch {layout['batch_size']} x accumulation "
            f"{layout['accumulation']}")


def apply_update(optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: Optional[Any], finite: bool) -> bool:
    """The update at the end of an optimizer step, or its skip; True when the weights were updated.

    A step is skipped when its loss or gradient is not finite (with `train.skip_nonfinite`) or when fp16's grad
    scaler finds inf/NaN gradients and skips it itself (`step_was_skipped`). A skipped step moves neither the
    weights nor the LR schedule, so the schedule counts updates, as accelerate's own scheduler wrapper does.
    Under fp16 the clipping has already unscaled the gradients (`unscale_`): the scaler must still `update()`
    after a skip (lowering its scale when it saw inf), or the next step's `unscale_` fails ("unscale_() has
    already been called on this optimizer since the last update()")."""
    if finite:
        optimizer.step()  # under fp16: scaler.step (skipped by the scaler on inf gradients) + scaler.update
        updated = not getattr(optimizer, "step_was_skipped", False)
    else:
        if scaler is not None:
            scaler.update()
        updated = False
    if updated:
        lr_scheduler.step()
    return updated


def reduce_metrics(accelerator: Any, sums: dict[str, Tensor], grad_norm: Optional[Tensor], safeguard: bool,
                   totals: Optional[dict[str, Tensor]] = None) -> dict[str, float]:
    """The step's metrics averaged over processes and its `totals` summed over them, as floats (one host sync per
    optimizer step)."""
    if grad_norm is None:  # an engine that clips internally and does not report the norm
        grad_norm = float("nan")
    keys = METRIC_KEYS + (("loser_scale",) if safeguard else ())
    totals = totals or {}
    device = accelerator.device
    stacked = torch.stack([sums[k].float() for k in keys] + [torch.as_tensor(grad_norm, device=device).float()]
                          + [torch.as_tensor(v, device=device).float() for v in totals.values()])
    values = accelerator.reduce(stacked, reduction="mean").tolist()
    n = len(keys)
    return {**dict(zip(keys, values[:n])), "grad_norm": values[n],
            **{k: v * accelerator.num_processes for k, v in zip(totals, values[n + 1:])}}


class MetricsLog:
    """metrics.jsonl (one JSON line per optimizer step), the trackers and the caller's callback; the main process
    writes, every process gets the record back."""

    def __init__(self, accelerator: Any, path: Path, callback: Optional[MetricsCallback] = None):
        self.accelerator, self.path, self.callback = accelerator, path, callback

    def truncate(self, step: int) -> None:
        """Keep metrics.jsonl consistent with the resumed step (drop lines a crashed run wrote after it)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append the step's line (`record` holds its "step") and log it to the trackers (main process)."""
        acc = self.accelerator
        record = dict(record)
        for key in NOT_ALWAYS_RUN:  # null, not NaN, when the step did not compute it (SFT skips the losers)
            if isinstance(record.get(key), float) and math.isnan(record[key]):
                record[key] = None
        if acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")  # one write per line: a kill leaves at most one partial line
            acc.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
            if self.callback is not None:
                self.callback(dict(record))
        return record


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm over optimizer steps (main process only)."""
    from tqdm.auto import tqdm

    # in a log file (not a terminal) a bar redrawn 10x a second is one endless line: redraw every 30 s
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval)
