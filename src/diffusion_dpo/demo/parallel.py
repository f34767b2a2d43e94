"""Run the demo's independent jobs (generations, trainings) side by side in worker processes.

The demo's models are tiny: one torch process spreads each small operation over the cores badly, so two
processes of one thread each get through two jobs sooner than one process of two threads running them in turn.
Measured on the 2-core machine (320 images at the demo's sampling): the flow base 2.94 s on two threads, 3.87 s
on one; two one-thread processes at once 3.9-4.0 s each, 1.47 times the throughput (the UNet base: 1.39 times).

`Workers(n)` keeps n spawned processes for the whole demo run, each with cpus // n threads and its output
discarded (the caller draws one bar per stage over the jobs done). A job is a module-level function and its
arguments; its result, or its exception (a UserError stays one line), comes back to the caller. With one worker
(a one-core machine) the jobs run in this process, one after the other. Each job seeds itself and every worker
has the same thread count, so a job computes the same on whichever worker it lands.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, Callable, Optional, Sequence

# The most worker processes: more than two one-thread jobs would each be slower on the 2-core machine measured,
# and on a large machine two processes of many threads each keep the cores busy.
MAX_WORKERS = 2


def available_cpus() -> int:
    """The cores this process may run on (its affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _start_worker(threads: int) -> None:
    import sys

    import torch

    # The workers' progress bars and library notices would overwrite each other and the caller's bar: they go
    # nowhere. What a job raises still comes back to the caller, with its traceback.
    quiet = open(os.devnull, "w")
    for fd in (1, 2):
        os.dup2(quiet.fileno(), fd)
    sys.stdout = sys.stderr = quiet
    torch.set_num_threads(threads)


class Workers:
    """A pool of `workers` processes (default: up to MAX_WORKERS, one per 1+ cores) for `map`."""

    def __init__(self, workers: Optional[int] = None):
        cpus = available_cpus()
        self.workers = max(1, min(MAX_WORKERS, cpus) if workers is None else workers)
        self.threads = max(1, cpus // self.workers)
        self._pool: Optional[ProcessPoolExecutor] = None
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.threads,))

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], done: Optional[Callable[[], None]] = None) -> list:
        """fn(*job) for every job, in parallel; the results in the jobs' order. `done` is called (here) as each
        finishes. The first failure cancels the jobs not yet started and is raised at once."""
        if self._pool is None:
            results = []
            for job in jobs:
                results.append(fn(*job))
                if done is not None:
                    done()
            return results
        futures: list[Future] = [self._pool.submit(fn, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                future.result()  # a failure is raised as soon as it happens
                if done is not None:
                    done()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]

    def close(self, stop_running: bool = False) -> None:
        """Shut the pool down after its running jobs, or (`stop_running`: Ctrl-C, a failure) kill them now; a
        killed job leaves no half-written output (generate and train write under temporary names)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if stop_running:
            # ProcessPoolExecutor has no public way to stop a running job before Python 3.14's terminate_workers
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.close(stop_running=kind is not None)
