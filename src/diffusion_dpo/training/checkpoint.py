"""Checkpoints: written atomically, found by `latest`, rotated, and restored exactly.

A checkpoint is a directory `checkpoint-<step>/` holding the trainable weights (the full UNet as
a diffusers `unet/` folder, or the LoRA adapter both in peft's naming for resuming and as
`pytorch_lora_weights.safetensors` for `load_lora_weights`), the optimizer and LR-scheduler
states, `train_state.json` (step, epoch, position in the epoch) and, for a streamed data set, every
process's loader state (`loader_state.json`). Training randomness is
derived from (seed, step), so these fully determine how the run continues.

Under FSDP/DeepSpeed the weights and optimizer states are sharded: every process writes its shards
into `engine/` (accelerate's save_state) instead, and the rest is as above.

It is first written as `checkpoint-<step>.tmp/` and renamed when complete: a crash during a save
leaves only a `.tmp` folder, which `latest` ignores and the next save replaces.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffusion_dpo.errors import UserError
from diffusion_dpo.pinning import PINS_FILE

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "train_state.json"
LOADER_FILE = "loader_state.json"  # data.streaming: [process 0's loader state, process 1's, ...]


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, current epoch, the pairs of that epoch's order already consumed (by
    all processes), and the layout that consumed them."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # pairs of `epoch`'s order already consumed (all processes); micro-batches before layouts
    skipped_steps: int = 0  # steps that did not update: a non-finite loss/gradient (train.skip_nonfinite), or fp16 inf gradients
    layout: Optional[dict] = None  # {"processes", "batch_size", "accumulation"} of the run that wrote it
    bad_pairs_skipped: int = 0  # data.image_check lazy / data.streaming: pairs passed over as bad when met
    stream: Optional[dict] = None  # data.streaming: the layout its loaders' states hold (`loop.stream_layout`)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: Optional[str], output_dir: Path, trust_sharded: bool = False) -> Optional[Path]:
    """`None` -> start fresh; 'latest' -> newest complete checkpoint (or fresh if none); a path -> that one.

    A sharded checkpoint (`engine/`, accelerate's FSDP/DeepSpeed state) is restored by unpickling: torch's
    distributed-checkpoint `.metadata` under FSDP, `weights_only=False` under DeepSpeed. One from outside this
    run's own output_dir could run code, so it is refused unless `trust_sharded` (train.trust_sharded_resume)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume: '{resume}' is not a checkpoint directory (no {STATE_FILE})")
    if (path / ENGINE_DIR).is_dir() and not trust_sharded and \
            not path.resolve().is_relative_to(output_dir.resolve()):
        raise UserError(f"train.resume: '{resume}' is a sharded (FSDP/DeepSpeed) checkpoint from outside output_dir "
                        f"'{output_dir}'; restoring it unpickles files that can run code: set "
                        "train.trust_sharded_resume true if you trust who wrote it")
    return path


ENGINE_DIR = "engine"  # accelerate's save_state of a sharded (FSDP/DeepSpeed) run, inside a checkpoint
RUN_MARKER = "diffusion_dpo_run.json"  # written by train into its output_dir: what --overwrite may clear
RUN_ARTIFACTS = ("final", "final.tmp", "metrics.jsonl", "samples", "logs", "config.yaml", PINS_FILE)
_STAGING = re.compile(r"^checkpoint-(\d+)\.tmp$")


def run_files(output_dir: Path) -> list[Path]:
    """What a train run writes into its output_dir (and --overwrite removes): checkpoint-<step>/ (and their .tmp
    staging folders), final/, metrics, samples, logs, config.yaml, the marker. Nothing else is ever touched."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if _NAME.match(p.name) or _STAGING.match(p.name)
                  or p.name in RUN_ARTIFACTS or p.name == RUN_MARKER)


def mark_run(output_dir: Path) -> None:
    """Write the marker that says output_dir holds a diffusion-dpo train run."""
    (output_dir / RUN_MARKER).write_text(json.dumps({"written_by": "diffusion-dpo train"}) + "\n")


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool, resume_asked: bool = False) -> None:
    """Refuse, before any work, an output_dir that holds an earlier run (unless resuming or overwriting) or
    that cannot be written. Creates nothing: a run that fails validation leaves no trace."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir '{output_dir}' exists and is not a directory")
    if overwrite and not resuming:
        found = run_files(output_dir)
        if found and not (output_dir / RUN_MARKER).is_file():
            raise UserError(f"--overwrite: output_dir '{output_dir}' holds {', '.join(p.name for p in found[:3])} but "
                            f"no {RUN_MARKER} (it was not written by diffusion-dpo train, or by a version before the "
                            "marker); nothing was deleted: remove those files yourself or choose another output_dir")
    if not resuming and not overwrite:
        earlier = [p.name for p in [*list_checkpoints(output_dir), output_dir / "final"] if p.exists()]
        if earlier and resume_asked:  # e.g. a finished run whose final step was never checkpointed
            raise UserError(f"output_dir '{output_dir}' holds a finished run ({', '.join(earlier[-2:])}) but no "
                            "checkpoint to resume from; start over with --overwrite or choose another output_dir")
        if earlier:
            raise UserError(f"output_dir '{output_dir}' holds an earlier run ({', '.join(earlier[-2:])}); continue it "
                            "with --train.resume latest, start over with --overwrite, or choose another output_dir")
    ancestor = output_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir '{output_dir}' cannot be created or written ({ancestor} is not a writable "
                        "directory)")


def clear_run(output_dir: Path) -> None:
    """Remove what an earlier run wrote (`run_files`): --overwrite. Only in a folder that carries the run marker:
    a folder that never held a run loses nothing (check_output_dir refused it already; this is the last guard)."""
    found = run_files(output_dir)
    if found and not (output_dir / RUN_MARKER).is_file():
        raise UserError(f"--overwrite: output_dir '{output_dir}' has no {RUN_MARKER}; nothing was deleted")
    for path in found:
        if path.name == RUN_MARKER:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def staging_dir(output_dir: Path, step: int) -> Path:
    """The temporary name checkpoint-<step> is written under (renamed when complete)."""
    return output_dir / f"checkpoint-{step}.tmp"


def new_staging_dir(output_dir: Path, step: int) -> Path:
    """An empty staging directory for `step` (a leftover of a killed save is removed)."""
    tmp = staging_dir(output_dir, step)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot write checkpoint {output_dir / f'checkpoint-{step}'}: {exc.strerror or exc}") from None
    return tmp


def save_checkpoint(output_dir: Path, state: TrainState, write_weights: Optional[Callable[[Path], None]],
                    optimizer: Optional[torch.optim.Optimizer], lr_scheduler: Any, total_limit: Optional[int],
                    scaler: Any = None, staged: bool = False, files: Optional[dict[str, str]] = None) -> Path:
    """Write checkpoint-<step>/ atomically (tmp dir, then rename) and rotate old ones beyond `total_limit`.

    `staged`: the staging directory already holds what every process wrote (a sharded engine's states,
    saved collectively); then `write_weights` and `optimizer` are None and only the rest is added. `files`: more
    text files to write into it ({name: text}: the streamed loaders' states)."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = staging_dir(output_dir, state.step) if staged else new_staging_dir(output_dir, state.step)
    try:
        if write_weights is not None:
            write_weights(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scaler is not None:  # fp16's loss scale: resuming without it would rescale from scratch
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    except OSError as exc:  # disk full, quota, permissions: earlier checkpoints stay intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final} at step {state.step}: {exc.strerror or exc}") from None
    if final.exists():  # a re-save of the same step (e.g. resumed then saved again): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> TrainState:
    """The `TrainState` checkpoint `path` recorded; one line if it cannot be read."""
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train.resume: {path} is not a usable checkpoint ({reason[:200]})") from None


def load_checkpoint(path: Path, read_weights: Optional[Callable[[Path], None]],
                    optimizer: Optional[torch.optim.Optimizer], lr_scheduler: Any, scaler: Any = None) -> TrainState:
    """Restore weights (through `read_weights`), optimizer, scheduler and fp16 scaler; return the `TrainState`.

    `read_weights` and `optimizer` are None when a sharded engine restored them (accelerate's load_state)."""
    if read_weights is not None:
        read_weights(path)
    try:
        # weights_only: a checkpoint directory is data, never code (a pickle that calls anything is refused)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        return read_state(path)
    except (OSError, pickle.UnpicklingError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train.resume: {path} is not a usable checkpoint ({reason[:200]})") from None


def read_loader_state(path: Path, rank: int) -> dict:
    """Process `rank`'s streamed-loader state in checkpoint `path`; one line if it is missing or unreadable."""
    try:
        states = json.loads((path / LOADER_FILE).read_text())
        return states[rank]
    except (OSError, ValueError, IndexError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train.resume: {path} has no usable {LOADER_FILE} for process {rank} ({reason[:200]})") \
            from None
