"""Pinned downloads (issue 34, finding 9): a hub source is resolved to one commit at a run's start, recorded, and
read at that commit from then on, resumes included, even after the hub's main has moved."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


from diffusion_dpo import pinning
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHA_A, SHA_B = "a" * 40, "b" * 40


def _fake_cache(cache: Path, repo: str, snapshots: dict[str, Path], main: str, kind: str = "models") -> None:
    """A Hugging Face hub cache holding `repo` at the given commits (folders copied in) with refs/main -> main."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    for sha, folder in snapshots.items():
        shutil.copytree(folder, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(main)


def test_resolve_commit_online_offline_and_commits(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants

    asked = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo, revision=None, repo_type=None:
                        asked.append((repo, revision, repo_type)) or SimpleNamespace(sha=SHA_A))
    assert pinning.resolve_commit("org/model") == SHA_A and asked == [("org/model", None, "model")]
    assert pinning.resolve_commit("org/model", SHA_B) == SHA_B and len(asked) == 1  # a commit is not asked for
    # offline: the cache's ref answers, or nothing does
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "datasets--org--data" / "refs").mkdir(parents=True)
    (tmp_path / "datasets--org--data" / "refs" / "v2").write_text(SHA_B)
    assert pinning.resolve_commit("org/data", "v2", repo_type="dataset") == SHA_B
    assert pinning.resolve_commit("org/data", repo_type="dataset") is None
    assert len(asked) == 1


def test_pins_are_reused_only_for_the_same_source_and_revision(monkeypatch, tmp_path):
    monkeypatch.setattr(pinning, "resolve_commit", lambda repo, revision=None, repo_type="model": SHA_B)
    local = tmp_path / "local-model"
    local.mkdir()
    cfg = load_config(None, {"model.pretrained": "org/model", "model.vae": "org/vae", "model.vae_revision": "v1",
                             "model.reference": str(local), "data.path": "org/data", "output_dir": str(tmp_path)})
    old = {"model.pretrained": pinning.Pin("model.pretrained", "org/model", None, SHA_A),
           "model.vae": pinning.Pin("model.vae", "org/vae", "v0", SHA_A),  # another revision asked: resolved anew
           "data.path": pinning.Pin("data.path", "org/other", None, SHA_A)}  # another source: resolved anew
    pins = pinning.pin_sources(cfg, old)
    assert [(p.setting, p.commit) for p in pins] == [("model.pretrained", SHA_A), ("model.vae", SHA_B),
                                                     ("data.path", SHA_B)]  # the local reference has no commit
    pinning.apply_pins(cfg, pins)
    assert (cfg.model.revision, cfg.model.vae_revision, cfg.model.reference_revision, cfg.data.revision) == \
        (SHA_A, SHA_B, None, SHA_B)
    pinning.write_pins(tmp_path, pins)
    assert pinning.read_pins(tmp_path) == {p.setting: p for p in pins}


def test_a_run_reads_the_commit_it_started_on_after_main_moves(tmp_path, tiny_sd):
    """train from a hub id (offline, from a cache): the commit main pointed at is pinned in pins.json, config.yaml
    and the model card; main then moves to a broken commit, and the resume still loads the pinned one."""
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    cache = tmp_path / "hub"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "unet")  # loading this commit would fail
    _fake_cache(cache, "org/tiny-sd", {SHA_A: tiny_sd, SHA_B: broken}, main=SHA_A)
    data = build_tiny_pickapic(tmp_path / "data", num_pairs=4, seed=0)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "diffusion_dpo", "train", "--output_dir", str(out), "--model.pretrained",
            "org/tiny-sd", "--data.path", str(data), "--data.resolution", "32", "--data.batch_size", "2",
            "--data.num_workers", "0", "--train.checkpointing_steps", "1", "--train.report_to", "none",
            "--validation.every_steps", "-1", "--optim.scale_lr", "false"]
    res = subprocess.run([*args, "--train.max_steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / pinning.PINS_FILE).read_text()) == [
        {"setting": "model.pretrained", "source": "org/tiny-sd", "requested": None, "commit": SHA_A}]
    assert f"revision: {SHA_A}" in (out / "config.yaml").read_text()
    assert SHA_A in (out / "final" / "README.md").read_text()
    (cache / "models--org--tiny-sd" / "refs" / "main").write_text(SHA_B)  # main moves on the hub
    res = subprocess.run([*args, "--train.max_steps", "3", "--train.resume", "latest"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / pinning.PINS_FILE).read_text())[0]["commit"] == SHA_A
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a new run in another folder reads main as it is now: the broken commit, refused in one line
    res = subprocess.run([*args[:4], str(tmp_path / "new"), *args[5:], "--train.max_steps", "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]


def test_generate_pins_a_hub_model_in_run_json(tmp_path, tiny_sd, monkeypatch):
    from huggingface_hub import constants

    from diffusion_dpo.evaluation.generate import generate

    cache = tmp_path / "hub"
    _fake_cache(cache, "org/tiny-sd", {SHA_A: tiny_sd}, main=SHA_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(pinning, "resolve_commit", lambda repo, revision=None, repo_type="model": SHA_A)
    out = tmp_path / "gen"
    generate(str(tiny_sd), ["a red cat"], [0], out, steps=1, height=32, width=32)  # a local model: no commit
    assert json.loads((out / "run.json").read_text())["model_revision"] is None
    pinned = pinning.is_hub_id("org/tiny-sd")
    assert pinned
    from diffusion_dpo.evaluation.generate import pinned_revision

    assert pinned_revision(out, "org/tiny-sd", None) == SHA_A
    (out / "run.json").write_text(json.dumps({"model": "org/tiny-sd", "requested_revision": None,
                                              "model_revision": SHA_B}))
    assert pinned_revision(out, "org/tiny-sd", None) == SHA_B  # a resume keeps the commit it started on
    assert pinned_revision(out, "org/tiny-sd", "v2") == SHA_A  # another revision asked: resolved anew


def test_reward_weights_are_read_at_one_commit_and_resumes_keep_it(tmp_path, monkeypatch):
    """A hub reward is read at the commit its main pointed at when first loaded; a compare records it and keys its
    score cache by it; a relabelling resumed after main moved reads the commit it began with."""
    from huggingface_hub import constants

    from diffusion_dpo.evaluation.compare import _cache_file
    from diffusion_dpo.evaluation.relabel import SETTINGS_FILE, relabel
    from diffusion_dpo.evaluation.rewards import common, load_reward
    from reward_fixtures import build_tiny_clip, solid

    clip = build_tiny_clip(tmp_path / "clip")
    broken = tmp_path / "broken"
    broken.mkdir()  # a commit holding nothing loadable
    cache = tmp_path / "hub"
    _fake_cache(cache, "org/tiny-clip", {SHA_A: clip, SHA_B: broken}, main=SHA_A)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(common, "_PINNED", {})  # a fresh process
    reward = load_reward("clip", path="org/tiny-clip")
    assert reward.commits == {"org/tiny-clip": SHA_A}
    assert _cache_file(tmp_path, "clip", None, {"org/tiny-clip": SHA_A}) != \
        _cache_file(tmp_path, "clip", None, {"org/tiny-clip": SHA_B})  # another commit, another score cache

    # a relabelling of local pairs: its settings record the commit
    (tmp_path / "imgs").mkdir()
    solid((255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    solid((0, 0, 255)).save(tmp_path / "imgs" / "b.png")
    (tmp_path / "d.jsonl").write_text('{"prompt": "red", "chosen": "imgs/a.png", "rejected": "imgs/b.png"}\n')
    relabel(tmp_path / "d.jsonl", "clip", tmp_path / "out", paths={"clip": "org/tiny-clip"})
    settings = json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())
    assert settings["reward_commits"] == {"org/tiny-clip": SHA_A}
    # main moves to the broken commit; a new process resuming the relabelling still reads SHA_A
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text(SHA_B)
    monkeypatch.setattr(common, "_PINNED", {})
    relabel(tmp_path / "d.jsonl", "clip", tmp_path / "out", paths={"clip": "org/tiny-clip"})
    monkeypatch.setattr(common, "_PINNED", {})
    with pytest.raises(UserError, match="reward 'clip': cannot load 'org/tiny-clip'"):
        load_reward("clip", path="org/tiny-clip")  # what a fresh, unpinned load reads now
