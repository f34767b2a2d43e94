"""`iterate`: pair rules by hand, rounds end to end (full and LoRA, both references, SD and the flow families), a kill
at any stage (in process at chosen points, and kill -9 of the real command at random moments) resumed to the same bits
as an uninterrupted run, the report, and bad input in one line before any work."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import FLOW_FAMILIES, tiny_family
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import UserError
from diffusion_dpo.iterate import Rounds, iterate
from diffusion_dpo.models import FAMILIES
from diffusion_dpo.models.components import load_pipeline_class
from diffusion_dpo.pairing import pairs_of_prompt
from test_training import read_metrics

TESTS = Path(__file__).parent
REWARD, HELDOUT = "iterate_rewards:brightness", "iterate_rewards:redness"


def test_pairs_by_hand():
    # best_worst: the best (0.9, the first of the two) against the worst (0.1); kept only above the margin
    (p,) = pairs_of_prompt([0.5, 0.9, 0.1, 0.9], "best_worst", 0.0)
    assert (p.winner, p.loser, p.margin) == (1, 2, pytest.approx(0.8))
    assert pairs_of_prompt([0.5, 0.9, 0.1], "best_worst", 0.8) == []  # 0.8 is not more than 0.8
    assert pairs_of_prompt([0.3, 0.3], "best_worst", 0.0) == []  # all alike: no pair
    # all: every two samples farther apart than the margin, the higher first
    got = [(q.winner, q.loser, round(q.margin, 6)) for q in pairs_of_prompt([0.2, 0.5, 0.45], "all", 0.1)]
    assert got == [(1, 0, 0.3), (2, 0, 0.25)]  # (1, 2) differ by 0.05 <= 0.1


def test_the_report_shows_every_heldout_reward_under_its_short_name(tmp_path):
    from diffusion_dpo.iterate_report import _markdown, short_name

    assert short_name("pkg.mod:crowd_reward") == "crowd_reward" and short_name("aesthetic") == "aesthetic"
    labels = ("pkg.rewards:ai", "pkg.rewards:crowd", "pkg.dev:dev")  # the training reward, two held-out ones

    def result(win: float, diff: float) -> dict:
        return {"image_win_rate": win, "image_ci_low": win - 0.1, "image_ci_high": win + 0.1, "mean_diff": diff,
                "mean_diff_ci_low": diff - 0.5, "mean_diff_ci_high": diff + 0.5}

    rounds = [{"round": k, "pairs": 10, "train_reward_of_samples": -1.0, "overoptimisation_gap": 0.1,
               "diversity_ratio": 0.9, "vs_base": {lab: result(0.6 + 0.1 * k + 0.01 * i, 1.0 * k) for i, lab in
                                                   enumerate(labels)},
               "vs_previous": {lab: result(0.55, 0.2) for lab in labels}} for k in (1, 2)]
    report = {"train_reward": labels[0], "heldout_reward": labels[1], "rounds": rounds, "stopped": None,
              "final": "f", "base": {"means": {lab: -2.0 for lab in labels}}}
    text = _markdown(report)
    assert "| round | pairs | ai of its samples | win vs base (crowd) |" in text  # headers: the function's name
    assert "`pkg.rewards:crowd`" in text  # the full name once, in the legend line
    assert "| 2 | dev | 0.820 [0.720, 0.920] | 0.550 [0.450, 0.650] | +2 [+1.5, +2.5] |" in text  # the second one
    assert "Base: ai mean -2, crowd mean -2, dev mean -2." in text
    one = _markdown({**report, "rounds": [{**r, "vs_base": {k: v for k, v in r["vs_base"].items() if k != labels[2]}}
                                          for r in rounds]})
    assert "Every reward scored" not in one  # a single held-out reward: the main table says it all


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "train.txt").write_text("a red circle\na blue square\na green triangle\n")
    (root / "eval.txt").write_text("a red square\na blue circle\n")
    return root


@pytest.fixture(autouse=True)
def _rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def settings(out: Path, model: Path, prompts: Path, **overrides) -> dict[str, str]:
    """The tests' iterate settings by dotted name, `section__key=value` overrides applied."""
    base = {"output_dir": str(out), "model.pretrained": str(model), "data.resolution": "32", "data.batch_size": "2",
            "data.num_workers": "0", "optim.lr": "1e-3", "optim.scale_lr": "false", "optim.lr_warmup_steps": "0",
            "train.max_steps": "3", "train.checkpointing_steps": "0", "train.report_to": "none",
            "validation.every_steps": "-1", "iterate.rounds": "2", "iterate.prompts": str(prompts / "train.txt"),
            "iterate.eval_prompts": str(prompts / "eval.txt"), "iterate.samples_per_prompt": "2",
            "iterate.reward": REWARD, "iterate.heldout_rewards": f"[{HELDOUT}]", "iterate.steps": "2",
            "iterate.guidance_scale": "3.0"}
    base.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return base


def make_cfg(out: Path, model: Path, prompts: Path, **overrides):
    return load_config(None, settings(out, model, prompts, **overrides), iterate=True)


def test_full_rounds_continue_the_policy_against_the_previous_round(tmp_path, tiny_sd, prompt_files):
    out = tmp_path / "run"
    report = iterate(make_cfg(out, tiny_sd, prompt_files))
    r1, r2 = out / "round-1", out / "round-2"
    # round 2 samples with round 1's model at new seeds, and trains from it against it: log 2 at its first step
    assert json.loads((r2 / "samples" / "run.json").read_text())["model"] == str(r1 / "train" / "final")
    seeds = [{json.loads(line)["seed"] for line in (r / "samples" / "manifest.jsonl").read_text().splitlines()}
             for r in (r1, r2)]
    assert seeds == [{0, 1}, {2, 3}]
    assert read_metrics(r2 / "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the pairs: best vs worst per prompt, winner first, both scores kept, the labels' own scores
    table = pq.read_table(r1 / "pairs").to_pylist()
    labels = {json.loads(line)["file"]: json.loads(line)["score"] for line in (r1 / "labels.jsonl").read_text().splitlines()}
    assert len(table) == 3 and all(row["label_0"] == 1.0 and row["ai_score_0"] > row["ai_score_1"] for row in table)
    assert sorted(r["ai_score_0"] for r in table) == sorted(max(labels[f"images/{i:05d}_{s}.png"] for s in (0, 1))
                                                           for i in range(3))
    # the report: every round, both comparisons, both rewards, diversity, the last round's model
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["final"] == str(r2 / "train" / "final")
    means = [r["means"][HELDOUT] for r in report["rounds"]]
    assert report["best"]["round"] == 1 + int(means[1] > means[0])
    for r in report["rounds"]:
        for key in ("vs_base", "vs_previous"):
            assert set(r[key]) == {REWARD, HELDOUT} and 0.0 <= r[key][HELDOUT]["image_win_rate"] <= 1.0
        assert r["diversity_ratio"] > 0 and r["overoptimisation_gap"] is not None
    # round 1's "previous" is the base itself: the same comparison
    assert report["rounds"][0]["vs_previous"] == report["rounds"][0]["vs_base"]
    assert json.loads((out / "report.json").read_text()) == report
    assert "| 2 | 3 |" in (out / "report.md").read_text() and (out / "report.png").is_file()
    # a rerun of the finished command does nothing new; raising the rounds continues it
    iterate(make_cfg(out, tiny_sd, prompt_files))
    assert not (out / "round-3").exists()
    more = iterate(make_cfg(out, tiny_sd, prompt_files, iterate__rounds=3))
    assert len(more["rounds"]) == 3 and more["rounds"][:2] == report["rounds"]


def _final_weights(out: Path, rounds: int = 2, lora: bool = False) -> dict[str, torch.Tensor]:
    final = out / f"round-{rounds}" / "train" / "final"
    return load_file(final / ("pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"))


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (a BaseException, so no handler of ours catches it)."""


def _finished_outputs(out: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every file of a finished stage, which a rerun must leave as it is: a round with its
    round.json; its samples and pairs once pairs.json is written; labels.jsonl; a training with its final/; the
    base's evaluation images once a round began; and every image a generate manifest lists."""
    keep: set[Path] = set()
    rounds = sorted(out.glob("round-*"))
    for rd in rounds:
        if (rd / "round.json").is_file():
            keep |= set(rd.rglob("*"))
            continue
        if (rd / "pairs.json").is_file():
            keep |= {rd / "pairs.json", *(rd / "samples").rglob("*"), *(rd / "pairs").rglob("*")}
        if (rd / "train" / "final").is_dir():
            keep |= set((rd / "train").rglob("*"))
        keep.add(rd / "labels.jsonl")
    if rounds:
        keep |= set((out / "eval" / "base").rglob("*"))
    for manifest in out.rglob("manifest.jsonl"):
        for line in manifest.read_text().splitlines():
            try:
                keep.add(manifest.parent / json.loads(line)["file"])
            except json.JSONDecodeError:  # a line cut by the kill: its image is not finished
                pass
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(keep) if p.is_file()}


def _unchanged(before: dict[Path, tuple[int, int]]) -> list[str]:
    """The files of `before` a rerun removed, replaced or rewrote."""
    return [str(p) for p, st in before.items() if not p.is_file() or (p.stat().st_ino, p.stat().st_mtime_ns) != st]


def _counting_steps(m, ran: list[tuple[str, int]]) -> None:
    """Record in `ran` (round, optimizer step) of every loss a Trainer computes (one micro-step per step here)."""
    from diffusion_dpo import training

    real_step = training.Trainer.step

    def step(self, batch, micro_step):
        ran.append((self.output_dir.parent.name, self.state.step + 1))
        return real_step(self, batch, micro_step)
    m.setattr(training.Trainer, "step", step)


KILL_KW = dict(train__checkpointing_steps=1, lora__rank=4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sd, prompt_files):
    """An uninterrupted LoRA run, for the killed ones to match."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(TESTS))
        iterate(make_cfg(out, tiny_sd, prompt_files, **KILL_KW))
    return out


@pytest.mark.parametrize("where", ["label-2", "train-2-step-2", "evaluate-1"])
def test_a_killed_run_resumes_to_the_same_bits(tmp_path, tiny_sd, prompt_files, monkeypatch, straight, where):
    from diffusion_dpo.training.loop import MetricsLog

    kw = KILL_KW
    out = tmp_path / "killed"
    stage, r, *rest = where.split("-")
    with monkeypatch.context() as m:
        if stage == "train":  # mid-training: after the checkpoint of step 1, during step 2
            original = MetricsLog.write

            def write_metrics(self, record):  # self.path: <round-r>/<run>/metrics.jsonl
                if self.path.parent.parent.name == f"round-{r}" and record["step"] == int(rest[-1]):
                    raise Killed
                return original(self, record)
            m.setattr(MetricsLog, "write", write_metrics)
        else:
            original = getattr(Rounds, stage)

            def stop(self, round_index, *args):
                if round_index == int(r):
                    raise Killed
                return original(self, round_index, *args)
            m.setattr(Rounds, stage, stop)
        with pytest.raises(Killed):
            iterate(make_cfg(out, tiny_sd, prompt_files, **kw))
    if stage == "train":
        assert (out / "round-2" / "train" / "checkpoint-1").is_dir()
    assert not (out / "round-2" / "round.json").exists()  # the kill landed mid-run
    finished = _finished_outputs(out)
    assert finished  # at least the base's evaluation images and round 1's samples
    ran = []
    with monkeypatch.context() as m:
        _counting_steps(m, ran)
        resumed = iterate(make_cfg(out, tiny_sd, prompt_files, **kw))
    # every stage is deterministic, so equal bits alone cannot tell a resume from a redo: the rerun leaves each
    # finished stage's files alone, and trains only what was left (round 2, from its checkpoint of step 1)
    assert _unchanged(finished) == []
    assert ran == [("round-2", s) for s in ([2, 3] if stage == "train" else [1, 2, 3])]
    a, b = _final_weights(straight, lora=True), _final_weights(out, lora=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["rounds"][-1]["vs_base"] == json.loads((straight / "report.json").read_text())["rounds"][-1]["vs_base"]


# The child runs the real CLI; it announces itself once its imports are done, so the parent's kill lands in the run.
CHILD = """
import pathlib, sys
import torch, peft, transformers, diffusion_dpo.iterate, diffusion_dpo.training.trainer, diffusion_dpo.evaluation.generate
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel  # diffusers imports them lazily
from diffusion_dpo.cli import main
pathlib.Path(sys.argv[1]).write_text("ready")
sys.exit(main(sys.argv[2:]))
"""


def _cli_args(out: Path, model: Path, prompts: Path, **overrides) -> list[str]:
    """make_cfg's settings as `diffusion-dpo iterate` flags."""
    flat = settings(out, model, prompts, **overrides)
    return ["iterate", *(x for k, v in flat.items() for x in (f"--{k}", v))]


def test_sigkill_at_random_times_then_rerun_ends_with_the_same_bits(tmp_path, tiny_sd, prompt_files):
    """kill -9 of the real command at random moments (three kills, each rerun continuing what the last one left),
    then the same command to the end: the last round's weights and its comparison equal an uninterrupted run's.
    ITERATE_KILL_SEED picks other moments."""
    import os
    import random
    import signal
    import time

    from diffusion_dpo.cli import main

    seed = int(os.environ.get("ITERATE_KILL_SEED", "0"))
    straight, run = tmp_path / "straight", tmp_path / "killed"
    began = time.perf_counter()
    assert main(_cli_args(straight, tiny_sd, prompt_files, **KILL_KW)) == 0
    span = time.perf_counter() - began  # how long the run itself takes once imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # three random points of the run; each rerun continues where the last kill left it, so killing it the gap
    # after the previous point lands (about) at the next one: the points spread over all the stages of both rounds
    rng = random.Random(seed)
    points = sorted(rng.uniform(0.0, span) for _ in range(3))
    history = []
    for kill, delay in enumerate(b - a for a, b in zip([0.0, *points], points)):
        ready = tmp_path / f"ready-{kill}"
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), *_cli_args(run, tiny_sd, prompt_files,
                                                                                        **KILL_KW)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished (or failed) before the kill
            assert proc.returncode == 0, f"seed {seed}, after kills {history}: {proc.stderr.read()[-3000:]}"
            assert kill, f"seed {seed}: the run ended before the first kill, so no kill landed in it"
            history.append((round(delay, 2), "finished"))
            break
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0 and kill:  # a later rerun may end by itself between the poll and the signal
            history.append((round(delay, 2), "finished"))
            break
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}, after kills {history}: {proc.stderr.read()[-3000:]}"
        if kill == 0:  # the first kill (within the straight run's span of the child being ready) lands in the run
            assert not (run / "round-2" / "round.json").exists(), f"seed {seed}: the first kill came after the run"
        left = sorted(str(p.relative_to(run)) for p in run.glob("round-*/*")) if run.exists() else []
        history.append((round(delay, 2), left[-3:]))
    finished = _finished_outputs(run)
    left_to_train = []  # (round, step) the rerun must train: the steps after each unfinished round's last checkpoint
    for r in (1, 2):
        train_dir = run / f"round-{r}" / "train"
        if not (train_dir / "final").is_dir():
            done = max((int(c.name.split("-")[1]) for c in train_dir.glob("checkpoint-*") if c.suffix != ".tmp"),
                       default=0)
            left_to_train += [(f"round-{r}", s) for s in range(done + 1, 4)]
    ran = []
    with pytest.MonkeyPatch.context() as m:
        _counting_steps(m, ran)
        assert main(_cli_args(run, tiny_sd, prompt_files, **KILL_KW)) == 0, f"seed {seed}, kills {history}"
    # equal bits alone cannot tell a resume from a redo: the rerun left every finished stage's files alone and
    # trained only what the kills left
    assert _unchanged(finished) == [], f"seed {seed}, kills {history}"
    assert ran == left_to_train, f"seed {seed}, kills {history}"
    a, b = _final_weights(straight, lora=True), _final_weights(run, lora=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}, kills {history}"
    want, got = (json.loads((d / "report.json").read_text())["rounds"] for d in (straight, run))
    assert [r["vs_base"] for r in got] == [r["vs_base"] for r in want], f"seed {seed}, kills {history}"
    assert not list(run.rglob("*.tmp")), f"seed {seed}: a temporary file was left behind"


LENGTH = {"zimage": 64, "flux2-klein": 64, "flux2": 64, "qwenimage": 256}  # the chat templates' tokens
# Whether a family's rounds are run here (full, LoRA): a round hands its final/ (or adapters) to the next through the
# family's own save and load, tested per family in test_flow_training; rounds are run for a plain MMDiT (SD3), a
# processor folder kept across rounds (FLUX.2 [dev]) and packed latents with a masked LLM (Qwen-Image). FLUX.1's
# LoRA rounds: test_continue.py. A family missing here fails the collection: decide for it.
ROUNDS = {"sd3": (True, True), "flux": (False, False), "zimage": (False, False), "flux2-klein": (False, False),
          "flux2": (True, True), "qwenimage": (True, True)}


@pytest.mark.parametrize("family", [f for f in FLOW_FAMILIES if ROUNDS[f][0]])
def test_full_flow_rounds_continue_the_policy_and_load_as_pipelines(request, tmp_path, prompt_files, family):
    """A full fine-tune of a flow transformer in rounds: round 2 samples with and trains from round 1's pipeline,
    against it (log 2 at its first step), and the last round's final/ is a pipeline the family's diffusers class
    loads, whose transformer moved away from the base's."""
    import diffusers

    model = tiny_family(request, family)
    out = tmp_path / "run"
    length = LENGTH.get(family, 8)
    report = iterate(make_cfg(out, model, prompt_files, model__max_sequence_length=length))
    r1, r2 = out / "round-1" / "train", out / "round-2" / "train"
    assert json.loads((out / "round-2" / "samples" / "run.json").read_text())["model"] == str(r1 / "final")
    assert f"pretrained: {r1 / 'final'}" in (r2 / "config.yaml").read_text()
    assert read_metrics(r2)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert report["final"] == str(r2 / "final")
    cls = getattr(diffusers, next(f for f in FAMILIES if f.name == family).pipelines[0])
    tuned, base = (load_pipeline_class(cls, str(p), json.loads((Path(p) / "model_index.json").read_text()))
                   for p in (report["final"], model))
    moved = [not torch.equal(p, q) for p, q in zip(tuned.transformer.parameters(), base.transformer.parameters())]
    assert any(moved) and type(tuned.transformer) is type(base.transformer)


@pytest.mark.parametrize("family", [f for f in FLOW_FAMILIES if ROUNDS[f][1]])
def test_lora_rounds_against_the_base_load_into_the_base_pipeline(request, tmp_path, prompt_files, family):
    from diffusion_dpo.evaluation.generate import generate

    model = tiny_family(request, family)
    out = tmp_path / "run"
    length = LENGTH.get(family, 8)
    report = iterate(make_cfg(out, model, prompt_files, lora__rank=4, iterate__reference="base",
                              model__max_sequence_length=length, iterate__stop_patience=5))
    r2 = out / "round-2" / "train"
    cfg = (r2 / "config.yaml").read_text()
    assert f"init_from: {out / 'round-1' / 'train' / 'final'}" in cfg and f"reference: {model}" in cfg
    # the reference is the base, the policy round 1's: not log 2 at round 2's first step
    assert abs(read_metrics(r2)[0]["loss"] - math.log(2)) > 1e-5
    # the last round's LoRA loads into the base pipeline and changes its images
    gen = tmp_path / "gen"
    generate(str(model), ["a red square"], [7], gen, lora=report["final"], steps=2, height=32, width=32,
             max_sequence_length=length)
    generate(str(model), ["a red square"], [7], tmp_path / "gen_base", steps=2, height=32, width=32,
             max_sequence_length=length)
    assert (gen / "images/00000_7.png").read_bytes() != (tmp_path / "gen_base/images/00000_7.png").read_bytes()


def test_stop_rule(tmp_path):
    from diffusion_dpo.iterate_report import stop_reason

    base = {"means": {"h": 1.0}}
    rounds = [{"eval": {"means": {"h": v}}} for v in (1.5, 1.4, 1.45)]
    assert stop_reason(base, rounds[:1], "h", 2, 0.0) is None
    assert stop_reason(base, rounds[:2], "h", 2, 0.0) is None  # one round without a new best
    assert "best 1.5 at round 1" in stop_reason(base, rounds, "h", 2, 0.0)  # two rounds without one
    assert stop_reason(base, rounds, "h", 0, 0.0) is None  # patience 0: never
    assert "round 0" in stop_reason(base, rounds[:1], "h", 1, 0.6)  # +0.5 is not more than 0.6


def test_best_round_is_the_highest_heldout_mean_and_the_report_names_it():
    from diffusion_dpo.iterate_report import _markdown, best_round

    base = {"means": {"h": 1.0}}
    rounds = [{"round": k, "final": f"r{k}", "eval": {"means": {"h": v}}} for k, v in ((1, 1.5), (2, 1.6), (3, 1.6),
                                                                                          (4, 1.2))]
    assert best_round(base, rounds, "h") == {"round": 2, "heldout_mean": 1.6, "beats_base": True, "final": "r2"}
    assert best_round(base, [], "h") is None
    worse = best_round({"means": {"h": 2.0}}, rounds, "h")
    assert worse["round"] == 2 and not worse["beats_base"]  # still the best round, said to lose to the base
    report = {"train_reward": "t", "heldout_reward": "h", "rounds": [], "stopped": None, "final": "r4",
              "base": {"means": {"h": 1.0}}, "best": best_round(base, rounds, "h")}
    assert "Best round by the held-out h mean: round 2 (1.6): `r2`." in _markdown(report)
    assert "Best round" not in _markdown({**report, "final": "r2"})  # the last round is the best: said once


def test_bad_input_fails_in_one_line_before_any_work(tmp_path, tiny_sd, prompt_files):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="iterate.samples_per_prompt must be >= 2"):
        make_cfg(out, tiny_sd, prompt_files, iterate__samples_per_prompt=1)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="holds no prompts"):
        iterate(make_cfg(out, tiny_sd, prompt_files, iterate__prompts=tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="unknown reward 'pickscor'"):
        iterate(make_cfg(out, tiny_sd, prompt_files, iterate__reward="pickscor"))
    with pytest.raises(UserError, match="no_such_module"):
        iterate(make_cfg(out, tiny_sd, prompt_files, iterate__reward="no_such_module:fn"))
    with pytest.raises(UserError, match="data.path must be empty for iterate"):
        make_cfg(out, tiny_sd, prompt_files, data__path=tmp_path)
    assert not out.exists()  # nothing was written by any of them
    with pytest.raises(UserError, match="round 1: 0 pairs .* fewer than one batch"):
        iterate(make_cfg(out, tiny_sd, prompt_files, iterate__margin=10, iterate__rounds=1))
    # the same directory with other settings is refused, naming the setting
    with pytest.raises(UserError, match="made with iterate.margin = 10.0, not 0.0"):
        iterate(make_cfg(out, tiny_sd, prompt_files, iterate__rounds=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an iterate run"):
        iterate(make_cfg(tmp_path / "other", tiny_sd, prompt_files))


def test_cli(tmp_path, tiny_sd, prompt_files):
    env_cmd = [sys.executable, "-m", "diffusion_dpo", "iterate", "--model.pretrained", str(tiny_sd),
               "--iterate.prompts", str(prompt_files / "train.txt"), "--iterate.eval-prompts",
               str(prompt_files / "eval.txt"), "--iterate.reward", REWARD, "--iterate.samples_per_prompt", "1",
               "--output-dir", str(tmp_path / "x")]
    run = subprocess.run(env_cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                        "PYTHONPATH": str(TESTS)})
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "diffusion-dpo: error: config: iterate.samples_per_prompt must be >= 2: a pair needs two samples of a "
        "prompt (got 1)"]
    helped = subprocess.run([sys.executable, "-m", "diffusion_dpo", "train", "--help"], capture_output=True, text=True)
    assert "--iterate." not in helped.stdout  # the iterate section belongs to iterate only


@pytest.mark.xdist_group("processes")  # one port, and two cores: never beside another
def test_two_cpu_processes_train_what_one_process_trains(tmp_path, tiny_sd, prompt_files):
    """`accelerate launch` (gloo on the CPU): both processes sample, score (each its share) and train; the main
    process writes labels, pairs and comparisons once; the labels and the round's weights match one process with
    twice the per-process batch."""
    import os

    args = ["--model.pretrained", str(tiny_sd), "--data.resolution", "32", "--data.num_workers", "0",
            "--optim.lr", "0.1", "--optim.adam_epsilon", "1.0", "--optim.weight_decay", "0", "--optim.scale_lr",
            "false", "--optim.lr_warmup_steps", "0", "--train.max_steps", "2", "--train.checkpointing_steps", "0",
            "--train.report_to", "none", "--validation.every_steps", "-1", "--iterate.rounds", "2",
            "--iterate.prompts", str(prompt_files / "train.txt"), "--iterate.eval_prompts",
            str(prompt_files / "eval.txt"), "--iterate.samples_per_prompt", "2", "--iterate.reward", REWARD,
            "--iterate.steps", "2", "--iterate.guidance_scale", "3.0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(TESTS)}
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                          "diffusion_dpo", "iterate", *args, "--data.batch_size", "1", "--output-dir", str(two)],
                         env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done:") == 1 and res.stdout.count("round 2:") == 1  # printed once, rounds go on
    one = tmp_path / "one"
    from diffusion_dpo.cli import main

    assert main(["iterate", *args, "--data.batch_size", "2", "--output-dir", str(one)]) == 0  # in this process
    a, b = _final_weights(two), _final_weights(one)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert json.loads((two / "report.json").read_text())["rounds"][0]["pairs"] == 3
    label_of = {run: {row["file"]: row["score"] for row in map(json.loads, (run / "round-1" / "labels.jsonl")
                                                                .read_text().splitlines())} for run in (two, one)}
    assert label_of[two].keys() == label_of[one].keys() and len(label_of[two]) == 6
    assert list(label_of[two].values()) == pytest.approx(list(label_of[one].values()), rel=1e-5)


def test_kto_rounds_train_on_each_rounds_best_and_worst_as_thumbs(tmp_path, tiny_sd, prompt_files):
    """An unpaired loss in iterate: each round's pairs are split into thumbs up (best) and down (worst)."""
    out = tmp_path / "run"
    iterate(make_cfg(out, tiny_sd, prompt_files, loss__name="kto", loss__beta=1000, iterate__rounds=1,
                     lora__rank=4), print)
    pairs = json.loads((out / "round-1" / "pairs.json").read_text())["pairs"]
    metrics = read_metrics(out / "round-1" / "train")
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6) and metrics[0]["model_mse_l"] is None
    config = (out / "round-1" / "train" / "config.yaml").read_text()
    assert "unpaired: true" in config and pairs == 3
    assert json.loads((out / "report.json").read_text())["rounds"][0]["round"] == 1


@pytest.mark.parametrize("loss", [dict(loss__name="mapo", loss__beta=0.1, iterate__reference="base"),
                                  dict(loss__safeguard="true")], ids=["mapo", "safeguard"])
def test_mapo_and_safeguard_rounds_continue_the_policy(tmp_path, tiny_sd, prompt_files, loss):
    """MaPO and the winner safeguard in LoRA rounds: round 2 starts from round 1's adapters; MaPO loads no reference
    even when iterate.reference is base, and each step's loss is its formula of the logged errors; the safeguard's
    scale is logged every step."""
    from diffusion_dpo.training.losses import mapo_loss

    out = tmp_path / "run"
    iterate(make_cfg(out, tiny_sd, prompt_files, lora__rank=4, data__batch_size=1, **loss))  # a step's loss: one pair's
    r2 = out / "round-2" / "train"
    config = (r2 / "config.yaml").read_text()
    assert f"init_from: {out / 'round-1' / 'train' / 'final'}" in config
    for m in read_metrics(r2):
        if "loss__safeguard" in loss:
            assert 0.0 <= m["loser_scale"] <= 1.0
            continue
        by_hand = mapo_loss(torch.tensor([m["model_mse_w"]], dtype=torch.float64),
                            torch.tensor([m["model_mse_l"]], dtype=torch.float64), None, None, beta=0.1).loss
        assert m["loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    if "loss__safeguard" not in loss:
        assert "reference: null" in config  # the base is not loaded as a reference MaPO would not use
