"""evaluation.compare and cli.eval_commands: win rate / CI / sign test against hand computations, compare reports,
score caching, the evaluation subcommands, and bad input as one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.compare import (bootstrap_ci, compare, load_run, paired_win_rate, per_prompt_means,
                                    score_run, sign_test)
from diffusion_dpo.evaluation.generate import MANIFEST, generate, image_name

BRIGHT = "dpo_eval_bright:brightness"  # the test reward module written by the `bright_reward` fixture
REWARD_MODULE = '''
import numpy as np

CALLS = []


def brightness(images, prompts):
    """Mean pixel value in [0, 255]: prefers brighter images."""
    CALLS.append(len(images))
    return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]


def nan(images, prompts):
    return [float("nan")] * len(images)
'''


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine spinning threads cost 100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bright_reward(tmp_path, monkeypatch):
    """`dpo_eval_bright:brightness`, importable for this test; returns the module (its CALLS list)."""
    (tmp_path / "dpo_eval_bright.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dpo_eval_bright", raising=False)
    import dpo_eval_bright

    return dpo_eval_bright


def fake_run(run: Path, grey: dict[tuple[int, int], int], prompts: list[str]) -> Path:
    """A run directory as `generate` writes it, with one solid grey 8x8 image per (prompt_index, seed)."""
    (run / "images").mkdir(parents=True, exist_ok=True)
    with open(run / MANIFEST, "w") as f:
        for (i, s), level in grey.items():
            Image.new("RGB", (8, 8), (level,) * 3).save(run / image_name(i, s))
            f.write(json.dumps({"prompt": prompts[i], "prompt_index": i, "seed": s, "file": image_name(i, s),
                                "model": run.name}) + "\n")
    return run


@pytest.fixture(scope="module")
def tiny_run(tiny_sd, tmp_path_factory):
    """A real (tiny) generation run: 3 prompts x 2 seeds."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    generate(str(tiny_sd), ["a red cat", "a blue dog", "a green tree"], [0, 1], out, steps=2, guidance_scale=5.0,
             batch_size=3)
    return out


# ---------------------------------------------------------------- statistics by hand

def test_sign_test_exact_binomial():
    assert sign_test(0, 0) == 1.0  # nothing untied: no evidence
    assert sign_test(1, 1) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # 2 * C(5,0) / 2^5
    assert sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 2 * (C(10,0)+C(10,1)+C(10,2)) / 2^10
    assert sign_test(6, 4) == pytest.approx(2 * 386 / 1024)  # sum_{i<=4} C(10,i) = 1+10+45+120+210 = 386
    assert sign_test(5, 5) == 1.0  # 2 * 638/1024 > 1: capped
    assert sign_test(3, 9) == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)


def test_win_rate_by_hand():
    # 3 prompts x 2 seeds, interleaved; per-prompt means: A = (2, 2, 0.5), B = (1, 2, 4)
    a = [3, 2, 0, 1, 2, 1]
    b = [1, 2, 4, 1, 2, 4]
    ids = ["p", "q", "r", "p", "q", "r"]
    assert per_prompt_means(a, ids).tolist() == [2, 2, 0.5]
    r = paired_win_rate(a, b, ids, n_boot=2000)
    # per-prompt wins (1, 0.5, 0) -> 0.5; untied: 1 win, 1 loss -> p = 2 * (1 + 2) / 4 -> 1
    assert (r.win_rate, r.wins, r.ties, r.losses, r.n_prompts, r.p_value) == (0.5, 1, 1, 1, 3, 1.0)
    assert (r.mean_a, r.mean_b) == (pytest.approx(1.5), pytest.approx(7 / 3))
    assert 0.0 <= r.ci_low <= 0.5 <= r.ci_high <= 1.0
    # effect size: per-prompt differences (1, 0, -3.5): mean -5/6, sample sd sqrt(67/12) -> d_z = -0.3527
    assert r.mean_diff == pytest.approx(-5 / 6)
    assert r.effect_size == pytest.approx((-5 / 6) / np.sqrt(67 / 12)) and r.effect_size == pytest.approx(-0.3527, abs=1e-4)
    # its paired bootstrap interval: a resample of 3 prompts is all "r" (mean -3.5) or all "p" (mean 1) with
    # probability 1/27 = 3.7% each, more than the 2.5% in each tail, so the interval is exactly [-3.5, 1]
    assert (r.mean_diff_ci_low, r.mean_diff_ci_high) == (-3.5, 1.0)
    # seeds averaged first: A wins prompt p on average although it loses one of p's two seeds
    r = paired_win_rate([5, 0], [1, 2], ["p", "p"], n_boot=100)
    assert (r.win_rate, r.wins, r.n_prompts) == (1.0, 1, 1)
    assert r.effect_size is None  # one prompt: no spread to standardize by
    # ... while per image it wins one of its two: 0.5
    assert (r.image_win_rate, r.n_images) == (0.5, 2)


def test_image_win_rate_by_hand_and_its_interval_resamples_prompts():
    # the 3 x 2 example above, per image: (1, 0.5, 0, 0.5, 0.5, 0) -> 2.5 / 6
    r = paired_win_rate([3, 2, 0, 1, 2, 1], [1, 2, 4, 1, 2, 4], ["p", "q", "r", "p", "q", "r"], n_boot=2000)
    assert r.image_win_rate == pytest.approx(2.5 / 6) and r.n_images == 6
    assert r.image_ci_low <= r.image_win_rate <= r.image_ci_high
    # 100 prompts x 4 seeds whose seeds always agree: 400 images but only 100 independent units, so the
    # interval is as wide as for 100 prompts (+-0.096), not for 400 images (+-0.048)
    ids = np.repeat(np.arange(100), 4)
    a = np.repeat(np.r_[np.ones(60), np.zeros(40)], 4)
    r = paired_win_rate(a, np.full(400, 0.5), ids, n_boot=10000)
    assert r.image_win_rate == pytest.approx(0.6)
    half = 1.96 * np.sqrt(0.6 * 0.4 / 100)
    assert r.image_ci_low == pytest.approx(0.6 - half, abs=0.02) and r.image_ci_high == pytest.approx(0.6 + half, abs=0.02)
    # unequal seeds per prompt: the rate weights images, not prompts (prompt p: 3 wins; q: 1 loss -> 3/4)
    r = paired_win_rate([1, 1, 1, 0], [0, 0, 0, 1], ["p", "p", "p", "q"], n_boot=500)
    assert (r.image_win_rate, r.win_rate) == (0.75, 0.5)
    assert r.image_ci_low == 0.0 and r.image_ci_high == 1.0  # resamples of (q, q) and (p, p)


def test_bootstrap_interval_matches_the_normal_approximation():
    w = np.array([1.0] * 60 + [0.0] * 40)  # 100 prompts, 60 wins
    low, high = bootstrap_ci(w, n_boot=10000, seed=0)
    half = 1.96 * np.sqrt(0.6 * 0.4 / 100)  # 0.096
    assert low == pytest.approx(0.6 - half, abs=0.02) and high == pytest.approx(0.6 + half, abs=0.02)
    assert bootstrap_ci(w, 500, seed=3) == bootstrap_ci(w, 500, seed=3)  # seeded: reproducible
    assert bootstrap_ci(np.ones(7), 100) == (1.0, 1.0)


# ---------------------------------------------------------------- compare and score

def test_compare_run_with_itself(tiny_run, tmp_path, bright_reward):
    from reward_fixtures import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    report = compare(tiny_run, tiny_run, [BRIGHT, "clip"], tmp_path / "cmp", paths={"clip": str(clip)}, n_boot=500)
    for label in (BRIGHT, "clip"):
        r = report["rewards"][label]
        assert r["win_rate"] == 0.5 and r["ci_low"] <= 0.5 <= r["ci_high"] and r["p_value"] == 1.0
        assert (r["ties"], r["n_prompts"]) == (3, 3) and r["mean_a"] == r["mean_b"]
    assert report["n_images"] == 6 and report["seeds"] == [0, 1] and report["a"]["steps"] == 2
    out = tmp_path / "cmp"
    assert json.loads((out / "compare.json").read_text()) == report
    md = (out / "compare.md").read_text()
    assert "| clip | 0.500 | [0.500, 0.500] | 1 | 0 / 3 / 0 |" in md
    assert "| 0 [0, 0] | - |" in md  # identical runs: mean difference 0, a degenerate interval, no d_z
    assert "per-image win rate at one seed" in md and report["protocol"] in md  # which number is the paper's
    with Image.open(out / "scores.png") as scores_png:  # one panel per reward (about 250 px each), stacked
        assert scores_png.height > 2 * 200 and scores_png.width > 400
    grid = Image.open(out / "grid.png")
    assert grid.width == 2 * 128 and grid.height > 3 * 128  # A | B, 3 prompts, enlarged to 128 px cells


def test_brighter_run_wins_and_weighted_specs(tmp_path, bright_reward):
    prompts = [f"prompt {i}" for i in range(6)]
    a = fake_run(tmp_path / "a", {(i, s): 200 - i for i in range(6) for s in (0, 1)}, prompts)
    b = fake_run(tmp_path / "b", {(i, s): 50 + 10 * s for i in range(6) for s in (0, 1)}, prompts)
    report = compare(a, b, [BRIGHT, "dpo_eval_bright:brightness=-1"], tmp_path / "cmp", n_boot=200)
    r = report["rewards"][BRIGHT]
    assert (r["win_rate"], r["ci_low"], r["ci_high"], r["wins"]) == (1.0, 1.0, 1.0, 6)
    assert r["p_value"] == pytest.approx(2 / 2 ** 6)
    assert r["mean_a"] == pytest.approx(200 - 2.5) and r["mean_b"] == pytest.approx(55)
    assert report["rewards"]["dpo_eval_bright:brightness=-1"]["win_rate"] == 0.0  # w = -1 flips the preference
    with Image.open(tmp_path / "cmp" / "grid.png") as grid:
        assert grid.height > 6 * 128  # up to 8 prompts: all 6 shown


def test_scores_are_cached_per_image(tmp_path, bright_reward):
    run = fake_run(tmp_path / "r", {(0, 0): 10, (1, 0): 20}, ["x", "y"])
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 20]
    assert bright_reward.CALLS == [2]
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 20] and bright_reward.CALLS == [2]  # from the cache
    assert (run / "scores_dpo_eval_bright_brightness.jsonl").is_file()
    Image.new("RGB", (8, 8), (30,) * 3).save(run / image_name(1, 0))  # regenerated: new mtime -> rescored
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 30] and bright_reward.CALLS == [2, 1]
    assert score_run(run, [BRIGHT], cache=False)[BRIGHT].tolist() == [10, 30] and bright_reward.CALLS == [2, 1, 2]


def test_forged_or_old_score_cache_lines_are_not_used(tmp_path, bright_reward):
    """The cache is keyed by the sha256 of the image's bytes: a file name and mtime prove nothing (tar keeps them)."""
    import hashlib
    import os

    run = fake_run(tmp_path / "r", {(0, 0): 10, (1, 0): 20}, ["x", "y"])
    cache = run / "scores_dpo_eval_bright_brightness.jsonl"
    mtime = (run / image_name(0, 0)).stat().st_mtime_ns
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    cache.write_text(json.dumps({"file": image_name(0, 0), "mtime_ns": mtime, "score": 999.0}) + "\n"  # old form
                     + json.dumps({"file": image_name(1, 0), "sha256": wrong, "score": 999.0}) + "\n")
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 20] and bright_reward.CALLS == [2]  # both rescored
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 20] and bright_reward.CALLS == [2]  # now cached
    # other bytes under the same name and mtime (an image swapped in a shipped run): scored again
    stat = (run / image_name(1, 0)).stat()
    Image.new("RGB", (8, 8), (40,) * 3).save(run / image_name(1, 0))
    os.utime(run / image_name(1, 0), ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert score_run(run, [BRIGHT])[BRIGHT].tolist() == [10, 40] and bright_reward.CALLS == [2, 1]


def test_manifest_files_must_stay_in_the_runs_images(tmp_path, bright_reward):
    run = fake_run(tmp_path / "a" / "r", {(0, 0): 10, (1, 0): 20}, ["x", "y"])
    Image.new("RGB", (8, 8), (255,) * 3).save(tmp_path / "secret.png")  # exists: refused for where it is
    (run / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    lines = (run / MANIFEST).read_text().splitlines()
    for file in ("../../secret.png", str(tmp_path / "secret.png"), "images/link.png", "images/../../../secret.png"):
        row = json.loads(lines[1]) | {"file": file}
        (run / MANIFEST).write_text("\n".join([lines[0], json.dumps(row)]) + "\n")
        message = rf"run '{run}': manifest.jsonl line 2: image '{file}' is not inside the run's images/ folder"
        _one_line(lambda: load_run(run), message)
        _one_line(lambda: score_run(run, [BRIGHT], cache=False), message)
    assert bright_reward.CALLS == []  # nothing outside the run was read
    # images/ itself a link out of the run
    (run / MANIFEST).write_text("\n".join(lines) + "\n")
    (run / "images").rename(tmp_path / "elsewhere")
    (run / "images").symlink_to(tmp_path / "elsewhere")
    _one_line(lambda: load_run(run), r"line 1: image 'images/00000_0.png' is not inside the run's images/")
    # a link inside images/ to another of its images is fine
    (run / "images").unlink()
    (tmp_path / "elsewhere").rename(run / "images")
    (run / "images" / "link.png").unlink()
    (run / "images" / "link.png").symlink_to(run / image_name(1, 0))
    (run / MANIFEST).write_text("\n".join([lines[0], json.dumps(json.loads(lines[1]) | {"file": "images/link.png"})]))
    assert [r["file"] for r in load_run(run)] == [image_name(0, 0), "images/link.png"]


# ---------------------------------------------------------------- bad input: one line each

def _one_line(call, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_compare_input(tmp_path, bright_reward):
    prompts = ["x", "y", "z"]
    a = fake_run(tmp_path / "a", {(0, 0): 1, (1, 0): 2}, prompts)
    _one_line(lambda: compare(a, a, ["pickscor"], tmp_path / "o"), "unknown reward 'pickscor'")
    _one_line(lambda: compare(a, a, ["clip"], tmp_path / "o", paths={"clip": str(tmp_path / "no" / "clip")}),
              "reward 'clip': model '.*no/clip' does not exist")
    _one_line(lambda: compare(a, a, [BRIGHT], tmp_path / "o", paths={"aesthetic": "w.pt"}),
              "weights path is given for reward 'aesthetic', which is not among")
    b = fake_run(tmp_path / "b", {(0, 0): 1, (1, 0): 2, (2, 0): 3}, prompts)
    _one_line(lambda: compare(a, b, [BRIGHT], tmp_path / "o"), r"runs differ: B \(.*\) has prompt 2 \('z'\) seed 0")
    c = fake_run(tmp_path / "c", {(0, 0): 1, (1, 0): 2}, ["x", "other"])
    _one_line(lambda: compare(a, c, [BRIGHT], tmp_path / "o"), "runs differ: prompt 1 is 'y' in A .* but 'other'")
    _one_line(lambda: score_run(a, ["dpo_eval_bright:nan"]), "reward 'dpo_eval_bright:nan' gave nan for image")
    (a / image_name(1, 0)).write_bytes(b"not a png")
    _one_line(lambda: score_run(a, [BRIGHT], cache=False), "image 'images/00001_0.png' cannot be read")
    (a / image_name(1, 0)).unlink()
    _one_line(lambda: load_run(a), rf"run '{a}': manifest.jsonl line 2: image 'images/00001_0.png' not found")
    _one_line(lambda: load_run(tmp_path), "no manifest.jsonl")


# ---------------------------------------------------------------- the subcommands

def _cli(argv: list[str]) -> tuple[int, str]:
    """Parse and dispatch like `diffusion-dpo` does: (exit code, the one error line)."""
    from diffusion_dpo.cli import eval_commands as cli_eval
    from diffusion_dpo.cli.app import _Parser

    parser = _Parser(prog="diffusion-dpo")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    cli_eval.register(sub, _Parser)
    try:
        args = parser.parse_args(argv)
        return cli_eval.COMMANDS[args.command](args), ""
    except UserError as exc:
        return 2, str(exc)


def test_cli_generate_score_compare(tiny_sd, tmp_path, bright_reward, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    gen = ["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--seeds", "0", "1", "--steps", "2",
           "--batch-size", "2", "--device", "cpu"]
    assert _cli(gen + ["--output-dir", str(tmp_path / "a")]) == (0, "")
    assert "2 prompts x 2 seeds: 4 images" in capsys.readouterr().out
    assert _cli(gen + ["--output-dir", str(tmp_path / "b"), "--guidance-scale", "1.0", "--limit", "2"]) == (0, "")
    assert _cli(["score", "--run", str(tmp_path / "a"), "--reward", BRIGHT, "--device", "cpu"]) == (0, "")
    assert json.loads((tmp_path / "a" / "scores.json").read_text())[BRIGHT]["n"] == 4
    assert _cli(["compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--reward", BRIGHT,
                 "--output-dir", str(tmp_path / "cmp"), "--bootstrap", "100", "--device", "cpu"]) == (0, "")
    assert f"{BRIGHT}: win rate A" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "grid.png").is_file()


def test_cli_bad_input_is_one_line(tiny_sd, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code, msg = _cli(["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--output-dir",
                      str(tmp_path / "g"), "--lora", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "lora weights" in msg and "do not exist" in msg
    code, msg = _cli(["score", "--run", str(tmp_path), "--reward", "nope"])
    assert code == 2 and "no manifest.jsonl" in msg
    code, msg = _cli(["compare", "--a", "x", "--b", "y", "--output-dir", "o", "--reward", "clip",
                      "--reward-path", "clip"])
    assert code == 2 and msg.startswith("--reward-path 'clip': write NAME=PATH")
    code, msg = _cli(["compare", "--a", "x"])
    assert code == 2 and "required" in msg and "\n" not in msg
