"""Surviving interruption and refusing harm: SIGKILL + resume, NaN guard, output-dir policy, safe loading."""

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusion_dpo.training.checkpoint as ckpt
from diffusion_dpo.cli import main
from diffusion_dpo.errors import UserError
from diffusion_dpo.training.losses import LossOutput, LossSpec, dpo_loss
from diffusion_dpo.training import Trainer, train
from test_training import make_cfg, read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=24, seed=3)


def weights_hash(final: Path) -> str:
    files = sorted(final.rglob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        for k, v in sorted(load_file(f).items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- kill -9 and resume

# The child runs the real CLI. With KILL_SAVE_AT=N it pauses inside the save of checkpoint-N (after the
# weights are written, before the rename) and announces it, so the parent can kill it mid-save. With STEPS_LOG it
# appends there, one line each, the optimizer step (1-based) of every loss it computes.
CHILD = """
import os, sys, time, pathlib, torch
import diffusion_dpo.training.checkpoint as c
import diffusion_dpo.training as t
if os.environ.get("STEPS_LOG"):
    real_step = t.Trainer.step
    def step(self, batch, micro_step):
        with open(os.environ["STEPS_LOG"], "a") as f:
            f.write(f"{self.state.step + 1}\\n")
        return real_step(self, batch, micro_step)
    t.Trainer.step = step
at = int(os.environ.get("KILL_SAVE_AT", "0"))
real_save = torch.save
def slow_save(obj, path, *a, **k):
    real_save(obj, path, *a, **k)
    if at and str(path).endswith(f"checkpoint-{at}.tmp/optimizer.pt"):
        pathlib.Path(os.environ["MARKER"]).write_text("in save")
        time.sleep(60)
c.torch.save = slow_save
from diffusion_dpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--output_dir", str(out), "--model.pretrained", str(model), "--data.path", str(data),
            "--data.resolution", "32", "--data.batch_size", "3", "--data.num_workers", "0",
            "--data.random_crop", "true", "--optim.lr", "1e-4", "--optim.scale_lr", "false",
            "--train.max_steps", "6", "--train.checkpointing_steps", "1", "--train.report_to", "none",
            "--validation.every_steps", "-1", *extra]


def _spawn(args: list[str], env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **env_extra}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"child ended early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the kill point"
        time.sleep(0.02)


# the full fine-tune's kills (its checkpoints hold the most: weights, optimizer, reference copy); LoRA's exact resume
# is tested in-process (test_training, test_flow_training, test_quantize): "4" here adds 30 s of suite
@pytest.mark.parametrize("lora", ["0"])
def test_sigkill_at_several_points_then_resume_gives_identical_weights(tmp_path, tiny_sd, tiny_data, lora,
                                                                       monkeypatch):
    straight = tmp_path / "straight"
    # the uninterrupted run goes through the same CLI in this process (a subprocess costs an import of torch)
    assert main(_args(straight, tiny_sd, tiny_data, "--lora.rank", lora)) == 0
    expected = weights_hash(straight / "final")

    run = tmp_path / "killed"
    args = _args(run, tiny_sd, tiny_data, "--lora.rank", lora)
    # 1) kill -9 as soon as step 2's metrics line exists (somewhere in step 3 or its save)
    proc = _spawn(args, {})
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2,
              proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # the kill landed in the run (it had not ended by itself)
    assert not (run / "final").exists()
    # 2) resume, and kill -9 inside the save of checkpoint-4 (weights written, not yet renamed)
    marker, steps_log = tmp_path / "marker", tmp_path / "steps-2"
    start = int(ckpt.resolve_resume("latest", run).name.split("-")[1])  # the checkpoint the resume must continue
    proc = _spawn(args + ["--train.resume", "latest"], {"KILL_SAVE_AT": "4", "MARKER": str(marker),
                                                        "STEPS_LOG": str(steps_log)})
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (run / "checkpoint-4.tmp").is_dir() and not (run / "checkpoint-4").exists()
    assert ckpt.resolve_resume("latest", run).name == "checkpoint-3"  # the half-written save is never picked
    # training is deterministic and a resume rewrites metrics.jsonl, so equal weights and losses alone cannot tell
    # a resume from a silent restart at step 0: each resumed process must compute only the steps left to it
    assert [int(n) for n in steps_log.read_text().split()] == list(range(start + 1, 5)), start
    # 3) resume to the end (in this process: what is on disk is all a resume reads)
    ran = []
    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self, batch, micro_step: ran.append(self.state.step + 1)
                        or real_step(self, batch, micro_step))
    assert main(args + ["--train.resume", "latest"]) == 0
    assert ran == [4, 5, 6]
    assert weights_hash(run / "final") == expected
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(straight)]
    assert not list(run.glob("*.tmp"))


def test_checkpoint_rotation_keeps_the_newest(tmp_path, tiny_sd, tiny_data):
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=5, train__checkpointing_steps=1,
                   train__checkpoints_total_limit=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_half_written_metrics_line_is_dropped_on_resume(tmp_path, tiny_sd, tiny_data):
    cfg = dict(train__max_steps=3, train__checkpointing_steps=2)
    train(make_cfg(tmp_path, tiny_sd, tiny_data, **cfg))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.5, "impl')  # what a kill in the middle of a write leaves
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__resume="latest", **cfg))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------- non-finite guard

def _nan_at(step: int) -> LossSpec:
    """The dpo loss, but NaN on the given (1-based) optimizer step."""
    calls = {"n": 0}

    def fn(*args, **kwargs) -> LossOutput:
        calls["n"] += 1
        out = dpo_loss(*args, **kwargs)
        if calls["n"] == step:
            out = LossOutput(loss=out.loss * float("nan"), inside=out.inside)
        return out

    return LossSpec(fn, "dpo, NaN on one step", needs_reference=True)


def test_nan_stops_the_run_naming_the_step_without_touching_weights(tmp_path, tiny_sd, tiny_data):
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=4, train__checkpointing_steps=1))
    trainer.method.loss_spec = _nan_at(3)
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 3 .*weights were not updated"):
        trainer.run()
    saved = load_file(tmp_path / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    current = trainer.accelerator.unwrap_model(trainer.denoiser).state_dict()
    assert all(torch.equal(saved[k], current[k]) for k in saved)


def test_skip_nonfinite_counts_and_continues(tmp_path, tiny_sd, tiny_data):
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=4, train__skip_nonfinite="true"))
    trainer.method.loss_spec = _nan_at(2)
    final = trainer.run()
    metrics = read_metrics(tmp_path)
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in load_file(final / "unet" / "diffusion_pytorch_model.safetensors").values())


# ---------------------------------------------------------------- output directory policy

def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, tiny_sd, tiny_data):
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=3, train__checkpointing_steps=1))
    before = weights_hash(tmp_path / "final")
    with pytest.raises(UserError, match="holds an earlier run .*--train.resume latest.*--overwrite"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=1))
    assert weights_hash(tmp_path / "final") == before
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=1, overwrite="true"))
    assert ckpt.list_checkpoints(tmp_path) == []  # the earlier run's checkpoints went with it
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_overwrite_deletes_nothing_in_a_folder_that_never_held_a_run(tmp_path, tiny_sd, tiny_data):
    """Issue 34 (8): --overwrite cleared logs/, samples/, config.yaml, metrics.jsonl and checkpoint-* in any folder."""
    folder = tmp_path / "my-project"
    for name in ("logs", "samples", "checkpoint-notes", "checkpoint-3"):
        (folder / name).mkdir(parents=True)
        (folder / name / "keep.txt").write_text("mine")
    for name in ("config.yaml", "metrics.jsonl", "notes.md"):
        (folder / name).write_text("mine")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(UserError, match="--overwrite: output_dir .* holds .* but no diffusion_dpo_run.json.*nothing "
                                        "was deleted"):
        Trainer(make_cfg(folder, tiny_sd, tiny_data, train__max_steps=1, overwrite="true"))
    with pytest.raises(UserError, match="nothing was deleted"):
        ckpt.clear_run(folder)  # the last guard, for a caller that skipped the check
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before


def test_overwrite_clears_only_a_runs_own_files(tmp_path, tiny_sd, tiny_data):
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=2, train__checkpointing_steps=1))
    assert (tmp_path / ckpt.RUN_MARKER).is_file()
    (tmp_path / "checkpoint-notes.txt").write_text("mine")  # not checkpoint-<digits>: never matched
    (tmp_path / "notes.md").write_text("mine")
    train(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=1, overwrite="true"))
    assert (tmp_path / "checkpoint-notes.txt").read_text() == "mine" and (tmp_path / "notes.md").is_file()
    assert ckpt.list_checkpoints(tmp_path) == [] and [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_a_sharded_checkpoint_from_elsewhere_is_refused_unless_trusted(tmp_path, tiny_sd, tiny_data):
    """Issue 34 (1): an FSDP/DeepSpeed checkpoint (engine/) is restored by unpickling; from outside the run's own
    output_dir it is refused before any work unless train.trust_sharded_resume."""
    foreign = tmp_path / "downloaded" / "checkpoint-5"
    (foreign / ckpt.ENGINE_DIR).mkdir(parents=True)
    (foreign / ckpt.STATE_FILE).write_text(json.dumps({"step": 5}))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="sharded .*checkpoint from outside output_dir.*train.trust_sharded_resume"):
        Trainer(make_cfg(out, tiny_sd, tiny_data, train__resume=str(foreign)))
    assert not out.exists()
    assert ckpt.resolve_resume(str(foreign), out, trust_sharded=True) == foreign
    own = out / "checkpoint-5"
    shutil.copytree(foreign, own)
    assert ckpt.resolve_resume(str(own), out) == own  # the run's own checkpoints need no trust
    assert ckpt.resolve_resume("latest", out) == own
    (foreign / ckpt.ENGINE_DIR).rmdir()
    assert ckpt.resolve_resume(str(foreign), out) == foreign  # plain checkpoints load only weights_only/safetensors


def test_the_torch_floor_has_a_safe_weights_only():
    """Issue 34 (2): torch < 2.6 lets a crafted file bypass torch.load(weights_only=True) (CVE-2025-32434)."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)(\.\d+)?", d) for d in deps if d.startswith("torch"))
    assert floor is not None and (int(floor[1]), int(floor[2])) >= (2, 6)


def test_unwritable_output_dir_fails_before_any_work(tmp_path, tiny_sd, tiny_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot be created or written"):
        Trainer(make_cfg(blocker / "run", tiny_sd, tiny_data))
    with pytest.raises(UserError, match="exists and is not a directory"):
        Trainer(make_cfg(blocker, tiny_sd, tiny_data))


def test_disk_full_at_save_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, tiny_sd, tiny_data, monkeypatch):
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=3, train__checkpointing_steps=1))
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(UserError, match="cannot write checkpoint .*checkpoint-2 at step 2: No space left on device"):
        trainer.run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- safe loading

class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_checkpoint_cannot_run_code(tmp_path, tiny_sd, tiny_data):
    cfg = dict(train__max_steps=2, train__checkpointing_steps=1)
    train(make_cfg(tmp_path, tiny_sd, tiny_data, **cfg))
    _Boom.marker = tmp_path / "pwned"
    with (tmp_path / "checkpoint-1" / "optimizer.pt").open("wb") as f:
        pickle.dump({"state": _Boom()}, f)
    with pytest.raises(UserError, match="checkpoint-1 is not a usable checkpoint"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__resume=str(tmp_path / "checkpoint-1"), **cfg)).run()
    assert not _Boom.marker.exists()


def test_a_model_index_cannot_name_code_outside_the_libraries(tmp_path, tiny_sd):
    import shutil

    from diffusion_dpo.config import ModelConfig
    from diffusion_dpo.models import load_components

    evil = tmp_path / "evil"
    shutil.copytree(tiny_sd, evil)
    index = json.loads((evil / "model_index.json").read_text())
    index["tokenizer"] = ["os", "system"]
    (evil / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="component tokenizer comes from .os.; only diffusers .* and transformers"):
        load_components(ModelConfig(pretrained=str(evil)))


def test_fp16_skipped_step_leaves_the_scaler_usable_and_the_schedule_still(monkeypatch):
    """Issue 15 defect 1: under fp16 the clipping unscales the gradients; a step then skipped for a non-finite loss
    must still let the scaler update, or the next unscale_ fails. Neither a skip nor the scaler's own skip (inf
    gradients) moves the LR schedule. (accelerate gives no grad scaler on a CPU; the same GradScaler runs here.)"""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    from diffusion_dpo.training.loop import apply_update

    AcceleratorState._reset_state(reset_partial_state=False)
    Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([weight], lr=0.1), device_placement=False, scaler=scaler)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=100)
    # step 1: NaN loss (skipped by us); step 2: inf gradient with a finite-looking loss (skipped by the scaler);
    # step 3: an ordinary step
    factors = [float("nan"), float("inf"), 1.0]
    updated, lrs, weights = [], [], []
    for factor in factors:
        loss = (weight * torch.tensor([factor, 1.0, 1.0, 1.0])).sum()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer.optimizer)  # what accelerate's clip_grad_norm_ does under fp16
        finite = math.isfinite(loss.item()) or factor == float("inf")
        lrs.append(schedule.get_last_lr()[0])
        updated.append(apply_update(optimizer, schedule, scaler, finite=finite))
        weights.append(weight.detach().clone())
        optimizer.zero_grad()
    assert updated == [False, False, True]
    assert lrs[0] == lrs[1] == lrs[2] == 0.1 and schedule.get_last_lr()[0] < lrs[2]  # moved by the update only
    assert torch.equal(weights[0], torch.ones(4)) and torch.equal(weights[1], torch.ones(4))
    assert not torch.equal(weights[2], torch.ones(4))
    assert scaler.get_scale() == 2.0 ** 2  # halved after each step that saw inf/NaN gradients


def test_skipped_step_does_not_advance_the_lr_schedule(tmp_path, tiny_sd, tiny_data):
    trainer = Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__max_steps=4, train__skip_nonfinite="true",
                               optim__lr_warmup_steps=10))
    trainer.method.loss_spec = _nan_at(2)
    trainer.run()
    lrs = [m["lr"] for m in read_metrics(tmp_path)]
    assert lrs[1] == lrs[2] and lrs[0] < lrs[1] < lrs[3]  # step 2 was skipped: step 3 uses its rate


def test_launcher_precision_that_disagrees_is_refused(tmp_path, tiny_sd, tiny_data, monkeypatch):
    """Issue 15 defect 4: `accelerate launch --mixed_precision fp16` reaches us as ACCELERATE_MIXED_PRECISION."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="accelerate launch sets mixed precision fp16 but train.mixed_precision is "
                                        "bf16; set the precision in one place"):
        Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__mixed_precision="bf16"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # launch's default when nothing was asked: no conflict
    Trainer(make_cfg(tmp_path, tiny_sd, tiny_data, train__mixed_precision="bf16"))
