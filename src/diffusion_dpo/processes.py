"""Several processes (one per GPU, on one node or many): their process group, decisions made once, shared folders.

- `process_state`: accelerate's `PartialState`, created with the process-group timeout (`train.process_group_timeout
  _minutes`): how long a process waits at a barrier or collective for the others before the job fails. torch's
  default under NCCL is 10 minutes, shorter than work one process may still do while the others wait (writing a
  full fine-tune's final/ pipeline, the main process's share of a merge).
- `decide_once`: a decision (which checkpoint to resume, which commit to pin) made by the main process and sent to
  every other, so that processes never decide differently from what each sees; an error there is raised, as the
  same one line, on every process instead of leaving the others waiting.
- `attempt` and `agree`: work every process does (open the cache, validate its share of the data) whose one-line
  error on ANY process is raised on all, so that no process waits at the next barrier for one that has stopped.
- `Share`: work cut into chunks and split over the processes (the cache build, the precomputed reference): this
  process's share, work done by all with errors agreed, work done by the main process with its result sent.
- `check_shared`: every process must see the run's folders (output_dir, cache.dir); a node-local folder would let
  node 0 resume while the others start from step 0. One sentinel file, written by the main process and looked
  for by every other, says which processes do not see it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch

from diffusion_dpo.errors import UserError

DEFAULT_TIMEOUT_MINUTES = 120
T = TypeVar("T")


def init_kwargs(timeout_minutes: Optional[float]) -> dict[str, Any]:
    """Keyword arguments for `torch.distributed.init_process_group` (through accelerate)."""
    return {"timeout": timedelta(minutes=timeout_minutes or DEFAULT_TIMEOUT_MINUTES)}


def process_state(timeout_minutes: Optional[float] = None) -> Any:
    """accelerate's `PartialState` of this process (one process unless started by `accelerate launch`). Without CUDA
    only cpu=True runs several processes (over gloo). The timeout applies when this call creates the process group
    (the first in the process)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), **init_kwargs(timeout_minutes))


def decide_once(state: Any, decide: Callable[[], T]) -> T:
    """`decide()` run by the main process only; its result (or its UserError, raised on every process) is sent to
    all. Every process must call it."""
    if state.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    message: list[Any] = [None]
    if state.is_main_process:
        try:
            message = [("ok", decide())]
        except UserError as exc:
            message = [("error", str(exc))]
    broadcast_object_list(message)
    kind, value = message[0]
    if kind == "error":
        raise UserError(value)
    return value


@dataclass
class Outcome:
    """What one process's `attempt` gave: its result, or the one-line error it raised."""

    result: Any = None
    error: Optional[str] = None


def attempt(work: Callable[[], T]) -> Outcome:
    """`work()`, its UserError kept instead of raised (the process must still reach the next collective)."""
    try:
        return Outcome(result=work())
    except UserError as exc:
        return Outcome(error=str(exc))


def agree(state: Any, outcome: Outcome) -> Any:
    """The result of this process's `attempt`, once every process has reported: the first error of any process is
    raised on all (naming the process when it is not the main one). Every process must call it."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [(rank, error) for rank, error in gather_object([(state.process_index, outcome.error)]) if error]
        if errors:
            rank, error = errors[0]
            raise UserError(error if rank == 0 else f"process {rank}: {error}")
    if outcome.error is not None:
        raise UserError(outcome.error)
    return outcome.result


def check_shared(state: Any, folders: Mapping[str, Path]) -> None:
    """Refuse, in one line, a folder of `folders` ({setting: path}) that some process does not see: the main process
    writes a sentinel into each, every process looks for them. The folders must exist (the main process made
    them). Every process must call it."""
    if state.num_processes == 1 or not folders:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(8) if state.is_main_process else None]
    broadcast_object_list(token)
    name = f".diffusion_dpo_shared_{token[0]}"
    if state.is_main_process:
        for folder in folders.values():
            (Path(folder) / name).write_text(token[0])
    state.wait_for_everyone()
    missing = [setting for setting, folder in folders.items() if not _sees(Path(folder) / name, token[0])]
    seen = gather_object([(state.process_index, _host(), missing)])
    state.wait_for_everyone()
    if state.is_main_process:
        for folder in folders.values():
            (Path(folder) / name).unlink(missing_ok=True)
    blind = [(rank, host, setting) for rank, host, settings in seen for setting in settings]
    if blind:
        setting = blind[0][2]
        who = ", ".join(f"{rank} ({host})" for rank, host, s in blind if s == setting)
        raise UserError(f"{setting} '{folders[setting]}' is not shared by all processes: process(es) {who} do not "
                        "see what the main process wrote there; put it on a filesystem every node mounts at the same "
                        "path")


def _sees(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else "?"


class Share:
    """This process's place among the processes that split a piece of work (one process: `state` None): its share
    of a list of chunks, work done by all with errors agreed, work done by the main process with its result sent."""

    def __init__(self, state: Any = None):
        self.state = state if state is not None and state.num_processes > 1 else None
        self.rank = self.state.process_index if self.state else 0
        self.count = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    def of_missing(self, items: list[T], done: Callable[[T], bool]) -> list[T]:
        """This process's share of the `items` not `done`: every count-th from its rank (chunks of like cost, so shares
        of like wall time). The main process lists them, before any process writes, and sends the list to all: a
        process listing them itself could see another's first chunk already written and take a different share."""
        return self.main_does(lambda: [item for item in items if not done(item)])[self.rank::self.count]

    def all_do(self, work: Callable[[], T]) -> T:
        """`work()` on every process; an error on any one is raised, as one line, on all."""
        return agree(self.state, attempt(work)) if self.state else work()

    def main_does(self, work: Callable[[], T]) -> T:
        """`work()` on the main process, its result (or its one-line error) on every process."""
        return decide_once(self.state, work) if self.state else work()
