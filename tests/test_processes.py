"""Several processes (issue 36): decisions made once, errors of any process raised on all, folders every process must
see, the process-group timeout, and resumes of multi-process runs, on the same layout and on another."""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_dpo.cli import main
from diffusion_dpo.data.items import PairSampler
from diffusion_dpo.training.checkpoint import TrainState
from diffusion_dpo.training.loop import continue_layout, layout_of, micro_batches
from test_cli import fast

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- the helpers, on two real gloo processes

def _two_processes(rank: int, port: int, out: str, case: str) -> None:
    """One of two processes (torch.multiprocessing): runs `case` and writes what it saw to out/rank-<rank>.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from diffusion_dpo.errors import UserError
    from diffusion_dpo.processes import agree, attempt, check_shared, decide_once, process_state

    state = process_state(timeout_minutes=3 if case != "timeout" else None)
    seen: dict = {}
    try:
        if case == "shared":
            # process 1 is given another folder for output_dir: what a node-local path looks like from node 1
            folder = Path(out) / ("shared" if rank == 0 else "node-local")
            folder.mkdir(exist_ok=True)
            check_shared(state, {"cache.dir": Path(out), "output_dir": folder})
        elif case == "decide":
            def decide():
                raise UserError("train.resume: 'x' is not a checkpoint directory")
            decide_once(state, decide)
        elif case == "agree":
            def work():
                if state.process_index == 1:
                    raise UserError("cache.dir 'c' holds no cache")
                return "opened"
            agree(state, attempt(work))
        elif case == "timeout":
            from torch.distributed.distributed_c10d import _get_default_group

            seen["timeout_s"] = _get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        seen["error"] = None
    except UserError as exc:
        seen["error"] = str(exc)
    except Exception:  # noqa: BLE001 - anything else is the test's failure, reported to it
        seen["error"] = "crash: " + traceback.format_exc()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


def run_two(tmp_path: Path, case: str) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_processes, args=(port, str(tmp_path), case), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_a_folder_one_process_does_not_see_is_named_on_every_process(tmp_path):
    seen = run_two(tmp_path, "shared")
    assert seen[0]["error"].startswith(f"output_dir '{tmp_path / 'shared'}' is not shared by all processes: "
                                       "process(es) 1 (")
    assert "is not shared by all processes: process(es) 1 (" in seen[1]["error"]  # (its own path: same on a cluster)
    assert not list(tmp_path.rglob(".diffusion_dpo_shared_*"))  # the sentinels are removed


def test_a_decision_and_its_error_reach_every_process(tmp_path):
    assert [s["error"] for s in run_two(tmp_path, "decide")] == ["train.resume: 'x' is not a checkpoint directory"] * 2


def test_an_error_on_one_process_stops_all(tmp_path):
    """Process 1 fails where process 0 succeeds: both raise it (process 0 would otherwise wait at the next barrier)."""
    assert [s["error"] for s in run_two(tmp_path, "agree")] == ["process 1: cache.dir 'c' holds no cache"] * 2


def test_the_process_group_waits_as_long_as_asked(tmp_path):
    """process_state's default: train.process_group_timeout_minutes's (120), not torch's (10 under NCCL)."""
    from diffusion_dpo.config import TrainConfig

    assert TrainConfig().process_group_timeout_minutes == 120
    assert [s["timeout_s"] for s in run_two(tmp_path, "timeout")] == [120 * 60] * 2


# ---------------------------------------------------------------- the data order under another layout

def test_another_layout_continues_at_the_same_pair():
    """A run of 1 process x batch 3 stopped after one micro-batch (3 pairs) continues on 2 processes x batch 2 at
    pair 3 of the same order: the processes' first micro-batches together are pairs 3..6, with the seeds the first
    run would have given them."""
    sampler = PairSampler(20, seed=7)
    order = sampler.order(0)
    state = TrainState(step=1, epoch=0, position=3, layout=layout_of(1, 3, 1))
    messages = []
    continue_layout(state, layout_of(2, 2, 1), messages.append)
    assert state.position == 3 and state.layout == layout_of(2, 2, 1)
    assert messages == ["train.resume: written by 1 process(es) x batch 3 x accumulation 1, continued by 2 process(es) "
                        "x batch 2 x accumulation 1: at pair 3 of epoch 0 in the same order"]
    data = type("Data", (), {"batch_size": 2, "num_workers": 0})()
    keys = []
    for rank in (0, 1):
        dataset = [(i, s) for i, s in zip(order, (sampler.sample_seed(0, p) for p in range(20)))]
        by_pair = {int(i): s for i, s in dataset}

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 20

            def __getitem__(self, key):
                return {"pair": torch.tensor(key[0]), "label": 1.0, "sample_seed": key[1] & 0x7FFFFFFFFFFFFFFF}

        _, batch = next(micro_batches(Items(), PairSampler(20, seed=7), data, state, rank, 2, pin_memory=False))
        keys += batch["pair"].tolist()
        assert [by_pair[p] & 0x7FFFFFFFFFFFFFFF for p in batch["pair"].tolist()] == batch["sample_seed"].tolist()
    assert keys == [int(i) for i in order[3:7]]


def test_a_checkpoint_from_before_layouts_counted_micro_batches():
    state = TrainState(step=2, epoch=1, position=2)  # two global micro-batches of 2 processes x batch 4
    continue_layout(state, layout_of(2, 4, 1), lambda m: pytest.fail(m))
    assert state.position == 16 and state.layout == layout_of(2, 4, 1)


# ---------------------------------------------------------------- resumes of several processes (accelerate launch)

def _launch(*args: str) -> subprocess.CompletedProcess:
    # --multi_gpu is accelerate's name for its torch.distributed launcher; without GPUs it runs gloo on the CPU
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                           "diffusion_dpo", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=16)


# eps = 1: Adam ~ SGD with momentum, so fp32 reduction-order noise is not amplified (see test_training)
SGD_LIKE = ["--optim.lr", "0.1", "--optim.adam_epsilon", "1.0", "--optim.weight_decay", "0",
            "--train.checkpointing_steps", "1", "--train.max_steps", "3"]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_two_process_runs_resume_on_two_and_a_one_process_run_on_two(tmp_path, tiny_sd, tiny_data):
    """A 2-process full fine-tune resumed from its checkpoint-1 on 2 processes ends with its uninterrupted weights,
    bit for bit, having run only steps 2 and 3 (it crashed in _load_checkpoint before: safetensors refused the
    device "cpu:0"). A 1-process run (batch 4) resumed on 2 processes (batch 2: the same 4 pairs per step) continues at
    its pair 4: it ends with the 1-process run's weights (up to the reduction order's float noise) and says so."""
    straight = tmp_path / "two"
    res = _launch(*fast(straight, tiny_sd, tiny_data, "--data.batch_size", "2", *SGD_LIKE))
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((straight / "checkpoint-1" / "train_state.json").read_text())
    assert state["position"] == 4 and state["layout"] == layout_of(2, 2, 1)

    resumed = tmp_path / "two-resumed"
    res = _launch(*fast(resumed, tiny_sd, tiny_data, "--data.batch_size", "2", *SGD_LIKE,
                        "--train.resume", str(straight / "checkpoint-1")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(ln)["step"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    one = tmp_path / "one"
    assert main(fast(one, tiny_sd, tiny_data, "--data.batch_size", "4", *SGD_LIKE)) == 0
    moved = tmp_path / "one-on-two"
    res = _launch(*fast(moved, tiny_sd, tiny_data, "--data.batch_size", "2", *SGD_LIKE,
                        "--train.resume", str(one / "checkpoint-1")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("train.resume: written by 1 process(es) x batch 4 x accumulation 1, continued by 2 "
                            "process(es) x batch 2 x accumulation 1: at pair 4 of epoch 0 in the same order") == 1
    a, b = _weights(one), _weights(moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # each step's errors depend on which pairs it drew: steps 2 and 3 drew the 1-process run's pairs
    one_m, moved_m = (_metrics(run)[-2:] for run in (one, moved))
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert [m[key] for m in moved_m] == pytest.approx([m[key] for m in one_m], rel=1e-4), key


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
