"""The offline demo: its world's splits and isolation, crowd labels, the written data, and a tiny end to end run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffusion_dpo.demo import pairs, scorers, world

ROOT = Path(__file__).resolve().parents[1]


def test_splits_are_disjoint_cover_everything_and_are_fixed():
    parts = world.splits()
    assert sorted(parts) == ["base", "judge", "scorers"]
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(set(everything.tolist())) == 1797  # disjoint and complete
    assert {k: len(v) for k, v in parts.items()} == {"base": 1078, "scorers": 359, "judge": 360}
    again = world.splits()
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_the_judge_is_fit_on_its_split_only_and_nothing_else_reads_that_split():
    parts = world.splits()
    judge = scorers.classifier("judge")
    assert judge.split == "judge" and np.array_equal(judge.train_index, parts["judge"])
    # it was fit on exactly those digits: refitting the same model on them gives the same predictions
    from sklearn.base import clone

    digits = world.load_digits()
    refit = clone(judge.model).fit(digits.ink[parts["judge"]].reshape(-1, 64), digits.labels[parts["judge"]])
    probe = digits.ink[:200].reshape(-1, 64)
    assert np.allclose(refit.predict_proba(probe), judge.model.predict_proba(probe))
    for name in ("crowd", "ai"):  # the labellers never saw a judge digit
        c = scorers.classifier(name)
        assert c.split == "scorers" and not set(c.train_index.tolist()) & set(parts["judge"].tolist())
    # the dev scorer (held-out reward of the online stage) sees neither the judge's digits nor the AI reward's
    dev = scorers.classifier("dev")
    assert dev.split == "base" and np.array_equal(dev.train_index, parts["base"])
    # the base model trains on the base split: its training pixels are exactly those digits
    from diffusion_dpo.demo.base import BaseRecipe, _pixels

    pixels, labels = _pixels(BaseRecipe())
    assert np.array_equal(labels, digits.labels[parts["base"]])
    first = np.asarray(world.to_image(digits.ink[parts["base"][0]]), np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.allclose(pixels[0].numpy(), first)


def test_prompts_name_their_digit_and_evaluation_phrasings_are_held_out():
    assert world.digit_of("a handwritten digit seven") == 7
    assert world.digit_of("the numeral 3 in ink") == 3
    with pytest.raises(ValueError):
        world.digit_of("a cat")
    pair_texts = {p["prompt"] for p in world.pair_prompts()}
    eval_texts = {p["prompt"] for p in world.eval_prompts()}
    assert not pair_texts & eval_texts
    assert all(world.digit_of(p["prompt"]) == p["digit"] for p in world.pair_prompts() + world.eval_prompts())
    assert len(eval_texts) == 120


def test_the_flow_base_tokenizers_read_every_caption_whole():
    """The flow base's T5 tokenizer (made offline from word pieces) and the word-level CLIP tokenizers turn every
    caption into known tokens, within the lengths the model is trained and sampled at (nothing truncated)."""
    from diffusion_dpo.demo.base import TOKEN_LENGTH, word_tokenizer
    from diffusion_dpo.demo.base_sd3 import T5_LENGTH, make_t5_tokenizer

    t5, clip = make_t5_tokenizer(), word_tokenizer()
    captions = [c for d in range(10) for c in world.all_captions(d)]
    for caption in captions:
        ids = t5(caption).input_ids
        assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id and len(ids) <= T5_LENGTH, caption
        assert len(ids) == len(caption.split()) + 1  # one piece per word, then </s>
        ids = clip(caption).input_ids
        assert clip.unk_token_id not in ids and len(ids) <= TOKEN_LENGTH, caption
    a, b = (t5(c, padding="max_length", max_length=T5_LENGTH).input_ids for c in ("digit 7", "digit seven"))
    assert a != b  # numeral and word stay distinct tokens


def test_bradley_terry_with_ties_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    p0, p1, tie = pairs.crowd_probabilities(np.array([0.0, 2.0]), np.array([0.0, 0.0]), temperature=1.0)
    # equal utilities: sigma(-0.3) each way, the rest is a tie
    assert p0[0] == pytest.approx(sig(-0.3)) and p1[0] == pytest.approx(sig(-0.3))
    assert tie[0] == pytest.approx(1 - 2 * sig(-0.3)) == pytest.approx(0.1489, abs=1e-4)
    # image 0 better by 2 nats: sigma(2 - 0.3) for it, sigma(-2 - 0.3) against
    assert p0[1] == pytest.approx(sig(1.7)) and p1[1] == pytest.approx(sig(-2.3))
    labels = pairs.crowd_labels(np.full(20000, 2.0), np.zeros(20000), 1.0, np.random.default_rng(0))
    assert set(np.unique(labels)) == {0.0, 0.5, 1.0}
    assert (labels == 1.0).mean() == pytest.approx(sig(1.7), abs=0.01)
    assert (labels == 0.5).mean() == pytest.approx(1 - sig(1.7) - sig(-2.3), abs=0.01)


def test_crowd_is_calibrated_to_pick_a_pic_agreement():
    """T is solved so that two independent crowd draws agree on 68% of the pairs both decide (by simulation)."""
    rng = np.random.default_rng(0)
    u0, u1 = rng.normal(0, 1, 4000), rng.normal(0, 1, 4000)
    temperature = pairs.calibrate_temperature(u0, u1)
    assert pairs.inter_rater_agreement(u0, u1, temperature) == pytest.approx(pairs.INTER_RATER_AGREEMENT, abs=1e-9)
    assert pairs.inter_rater_agreement(u0, u1, 2 * temperature) < pairs.INTER_RATER_AGREEMENT  # noisier crowd
    first, second = (pairs.crowd_labels(u0, u1, temperature, np.random.default_rng(s)) for s in (1, 2))
    both = (first != 0.5) & (second != 0.5)
    assert (first == second)[both].mean() == pytest.approx(pairs.INTER_RATER_AGREEMENT, abs=0.03)
    # identical images leave nothing to calibrate on: the most consistent crowd allowed, not a crash
    assert pairs.calibrate_temperature(np.zeros(5), np.zeros(5)) == pytest.approx(1e-3)


def test_rewards_load_through_the_registry_and_read_digits():
    from diffusion_dpo.evaluation.rewards import load_reward

    digits = world.split("judge")
    images = [world.to_image(ink) for ink in digits.ink[:20]]
    right = [f"a handwritten digit {world.NAMES[d]}" for d in digits.labels[:20]]
    wrong = [f"a handwritten digit {world.NAMES[(d + 5) % 10]}" for d in digits.labels[:20]]
    for spec in (scorers.JUDGE_REWARD, scorers.AI_REWARD, scorers.CROWD_REWARD):
        reward = load_reward(spec)
        assert (reward(images, right) > reward(images, wrong)).float().mean() > 0.9


def _fake_run(tmp_path, n_prompts=3, seeds=4):
    """A directory shaped like `generate`'s output, with real digit images."""
    digits = world.split("scorers")
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    lines = []
    for i in range(n_prompts):
        for s in range(seeds):
            file = f"images/{i:05d}_{s}.png"
            world.to_image(digits.ink[i * seeds + s]).save(run / file)
            d = int(digits.labels[i * seeds])
            lines.append({"prompt": f"digit {world.NAMES[d]}", "prompt_index": i, "seed": s, "file": file, "digit": d})
    (run / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    return run


def test_pairs_are_written_in_the_pickapic_schema_and_load_for_training(tmp_path):
    import pyarrow.parquet as pq

    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.pairs import load_preference_pairs
    from diffusion_dpo.evaluation.compare import load_run
    from diffusion_dpo.testing.tiny_data import SCHEMA

    run = _fake_run(tmp_path)
    result = pairs.label_pairs(run, load_run(run), tmp_path / "pairs", seed=0)
    table = pq.read_table(tmp_path / "pairs" / pairs.FILE)
    assert table.schema.names == SCHEMA.names and table.num_rows == result.pairs == 6  # 3 prompts x 2 pairs
    assert set(table.column("label_0").to_pylist()) <= {0.0, 0.5, 1.0}
    assert table.column("image_0_uid").to_pylist()[0] == "p0000-s0"
    loaded = load_preference_pairs(DataConfig(path=str(tmp_path / "pairs"), num_workers=0, keep_ties=True))
    assert len(loaded) == 6


def test_workers_return_results_in_order_and_a_user_error_as_raised():
    from diffusion_dpo.demo.parallel import Workers
    from diffusion_dpo.errors import UserError
    from diffusion_dpo.evaluation.generate import generate

    finished = []
    with Workers(2) as workers:
        assert workers.workers == 2 and workers.threads >= 1
        jobs = [(7, 2), (9, 4), (1, 1)]
        assert workers.map(divmod, jobs, done=lambda: finished.append(1)) == [(3, 1), (2, 1), (1, 0)]
        assert len(finished) == 3
        with pytest.raises(UserError, match="^no prompts to generate$"):  # the worker's exception, as it was
            workers.map(generate, [("model", [], [0], "out")])
        assert workers.map(divmod, [(5, 3)]) == [(1, 2)]  # the pool outlives a failed job
    assert Workers(1).map(divmod, [(7, 2)]) == [(3, 1)]  # one worker: in this process, no pool


def test_leaving_the_workers_on_an_error_stops_their_running_jobs():
    """Ctrl-C (or a failure) inside `with Workers()` does not wait for a running job to end."""
    import time

    from diffusion_dpo.demo.parallel import Workers

    workers = Workers(2)
    job = workers._pool.submit(time.sleep, 120)
    while not job.running():
        time.sleep(0.05)
    started = time.monotonic()
    workers.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert time.monotonic() - started < 30 and workers._pool is None


# The stages are family-blind: SD's run checks them end to end. SD3's base and its tokenizers are tested alone above;
# its end-to-end run (70 s of suite) and a rerun into the same directory (another 65 s) are kept out of the suite:
# add ("sd3", "StableDiffusion3Pipeline") here, or run the demo twice by hand, to check them.
@pytest.mark.parametrize("family, base_class", [("sd", "StableDiffusionPipeline")])
def test_tiny_demo_end_to_end_writes_every_output(tmp_path, family, base_class):
    from diffusion_dpo.demo.run import run_demo

    out, cache = tmp_path / "demo", tmp_path / "cache"
    report = run_demo(out, size="tiny", cache_dir=cache, family=family)
    for name in ("base/model_index.json", "dpo/model_index.json", "dpo_ai/model_index.json", "sft/model_index.json",
                 "dpo_online/model_index.json", "online/report.json", "online/round-2/train/final/model_index.json",
                 "eval_prompts.jsonl", "report.json", "report.md", "win_rates.png", "training_curves.png",
                 "score_distributions.png", "grid.png"):
        assert (out / name).is_file(), name
    for name in ("base", "dpo", "dpo_ai", "sft", "dpo_online"):
        assert json.loads((out / name / "model_index.json").read_text())["_class_name"] == base_class
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["family"] == family
    assert set(saved["win_rates_vs_base"]) == {"demo", "defaults"}
    for setting in ("demo", "defaults"):
        for judge in ("judge", "ai", "crowd"):
            for model in ("dpo", "dpo_ai", "sft", "dpo_online"):
                r = saved["win_rates_vs_base"][setting][judge][model]
                assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 and r["n"] == 20
                assert 0 <= r["image_ci_low"] <= r["image_win_rate"] <= r["image_ci_high"] <= 1
                assert r["n_images"] == 40 and "effect_size" in r
        assert set(saved["diversity"][setting]["ratio_to_base"]) == {"dpo", "dpo_ai", "sft", "dpo_online"}
        assert set(saved["failure_share"][setting]) == {"base", "dpo", "dpo_ai", "sft", "dpo_online"}
        assert "dpo_online_vs_online_round_1" in saved["head_to_head"][setting]
        assert f"{setting}: online_vs_round_1_ge_0.65" in saved["targets"]
    # the demo's own settings, and the pipeline's call defaults (what pipe(prompt) gives), as generate ran them
    demo, defaults = saved["sampling"]["demo"], saved["sampling"]["defaults"]
    assert demo["steps"] == 2
    # the tiny run samples its "defaults" evaluation at 2 steps (the README's run: the pipeline's own 50 / 28);
    # the guidance is the pipeline's default in both
    assert (defaults["steps"], defaults["guidance_scale"]) == (2, 7.5 if family == "sd" else 7.0)
    from diffusion_dpo.demo.settings import SIZES, default_sampling
    from diffusion_dpo.evaluation.generate import load_pipeline, pipeline_defaults

    assert default_sampling(SIZES[family]["full"])["steps"] is None  # None: generate takes the pipeline's own
    own = pipeline_defaults(load_pipeline(str(out / "base"))[0])
    assert (own["steps"], own["guidance_scale"]) == ((50, 7.5) if family == "sd" else (28, 7.0))
    assert demo["max_sequence_length"] == defaults["max_sequence_length"] == (None if family == "sd" else 12)
    # the online stage: iterate from DPO-AI, the last round's model copied to DIR/dpo_online, round 1 its start's child
    online = saved["online"]
    assert len(online["rounds"]) == 2 and online["final"] == str(out / "online" / "round-2" / "train" / "final")
    assert json.loads((out / "online" / "round-1" / "samples" / "run.json").read_text())["model"] == str(out / "dpo_ai")
    for stage in ("base", "pairs", "relabel", "train", "online", "generate", "compare", "report", "total"):
        assert saved["wall_time_s"][stage] >= 0
    lines = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(world.digit_of(p["prompt"]) == p["digit"] for p in lines)
    assert saved["base_built_now"] and len(list(cache.iterdir())) == 1  # one finished build, no leftovers
    md = (out / "report.md").read_text()
    assert "the pipeline's default steps and guidance" in md and "per image" in md


def test_a_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    from diffusion_dpo.demo import cache
    from diffusion_dpo.demo.settings import SIZES

    def boom(recipe, out_dir, progress=None):
        (out_dir / "model_index.json").write_text("{}")  # half-written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(type(SIZES["sd"]["tiny"].base), "build", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.cached_base(SIZES["sd"]["tiny"].base, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_entry_comes_first_then_the_shipped_base_then_a_build(tmp_path, monkeypatch):
    from diffusion_dpo.demo import cache
    from diffusion_dpo.demo.base import recipe_key
    from diffusion_dpo.demo.settings import SIZES

    recipe = SIZES["sd"]["tiny"].base
    built = []

    def build(recipe, out_dir, progress=None):
        built.append(out_dir)
        (out_dir / "model_index.json").write_text("{}")

    monkeypatch.setattr(type(recipe), "build", build)
    shipped = tmp_path / "bases" / f"base-{recipe_key(recipe, versions=False)}"
    shipped.mkdir(parents=True)
    (shipped / "model_index.json").write_text("{}")
    monkeypatch.setattr(cache, "SHIPPED", tmp_path / "bases")
    assert cache.cached_base(recipe, tmp_path / "c") == (shipped, False) and not built  # nothing written
    assert not (tmp_path / "c").exists()
    path, now = cache.cached_base(recipe, tmp_path / "c", rebuild=True)  # --rebuild builds into the cache
    assert now and path == tmp_path / "c" / f"base-{recipe.key()}" and len(built) == 1
    assert cache.cached_base(recipe, tmp_path / "c") == (path, False)  # the user's own build wins from then on


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_each_full_recipe_has_its_shipped_base(family):
    """A recipe change without re-shipping would silently make every fresh clone build (and measure) another base."""
    from dataclasses import asdict

    from diffusion_dpo.demo.cache import shipped_base
    from diffusion_dpo.demo.settings import SIZES

    recipe = SIZES[family]["full"].base
    path = shipped_base(recipe)
    assert path is not None, f"no shipped base for the {family} recipe: see demo/cache.py"
    written = json.loads((path / "recipe.json").read_text())
    assert {k: v for k, v in written.items() if k != "key"} == json.loads(json.dumps(asdict(recipe)))


def test_demo_refuses_a_directory_with_other_files(tmp_path, capsys):
    from diffusion_dpo.cli import main

    (tmp_path / "thesis.tex").write_text("keep me")
    assert main(["demo", "--output-dir", str(tmp_path), "--size", "tiny", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "thesis.tex" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "keep me"


def _tuning_script():
    """scripts/demo_tune.py, the demo's tuning harness (outside the installed package), as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_tune", ROOT / "scripts" / "demo_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_loop_never_touches_the_evaluation_prompts_or_seeds():
    tune = _tuning_script()
    from diffusion_dpo.demo.pairs import pair_seeds
    from diffusion_dpo.demo.settings import SIZES

    dev = {p["prompt"] for p in tune.dev_prompts()}
    assert dev and not dev & {p["prompt"] for p in world.eval_prompts()}
    dev_seeds = range(tune.DEV_SEED_START, tune.DEV_SEED_START + tune.DEV_SEEDS)
    assert max(pair_seeds(SIZES["sd"]["full"].pairs_per_prompt)) < min(dev_seeds)
    assert max(dev_seeds) < world.EVAL_SEED_START
    # the online trials: their own dev seeds, apart from the offline trials', the online rounds' and the evaluation's
    from diffusion_dpo.demo.settings import ONLINE_SEED

    online = SIZES["sd3"]["full"]
    round_seeds = range(ONLINE_SEED, ONLINE_SEED + online.online_rounds * online.online_samples)
    assert not set(tune.ONLINE_DEV_SEEDS) & (set(dev_seeds) | set(round_seeds))
    assert max(round_seeds) < min(tune.ONLINE_DEV_SEEDS) and max(tune.ONLINE_DEV_SEEDS) < world.EVAL_SEED_START
    assert tune._value("false") is False and tune._value("1000") == 1000 and tune._value("all") == "all"
    for bad in (["--set", "betta=1000"], ["--base", "transformer_stepz=300"],
                ["--base", "transformer_steps=300", "--online", "/nonexistent/demo"]):
        with pytest.raises(SystemExit):  # a misspelt setting is refused before anything runs
            tune.main(["--work-dir", "/nonexistent/never-made", *bad])


def test_the_tuning_loops_failing_share_is_the_dev_classifiers_reading(tmp_path):
    """A base's headroom in `tune`: the share of its images whose prompted digit the dev classifier doubts."""
    tune = _tuning_script()

    digits = world.split("base")
    three = world.to_image(digits.ink[list(digits.labels).index(3)])
    (tmp_path / "images").mkdir()
    rows = []
    for i, prompt in enumerate(["a handwritten digit 3", "digit seven", "the number three written by hand"]):
        three.save(tmp_path / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "prompt_index": i, "seed": 0, "file": f"images/{i}.png"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tune.failing_share(tmp_path) == pytest.approx(1 / 3)
