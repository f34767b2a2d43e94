"""The demo's development loop: try training settings on a dev metric that never involves the judge.

    python scripts/demo_tune.py --work-dir /tmp/tune-sd3 --set beta=500          # the flow demo (default)
    python scripts/demo_tune.py --family sd --work-dir /tmp/tune --set beta=500 lr=1e-5 --labels crowd
    python scripts/demo_tune.py --family sd --work-dir /tmp/tune --set beta_ai=500 --labels ai
    python scripts/demo_tune.py --work-dir /tmp/tune-sd3 --base transformer_steps=300 --set train_seed=1

Each trial trains one model exactly as `diffusion-dpo demo` would (`settings.train_config` with the given
`DemoSize` fields overridden), then samples it on the *pair* prompts (the phrasings the labels were
collected on) at `DEV_SEEDS`, a seed range that neither pair sampling nor the evaluation uses, and compares it
with the base under the crowd's utility, the AI reward and the dev classifier (scorers.py). The held-out judge,
its split and the evaluation prompts are never read here: this is the user's view, who can ask more people and
a reward model but has no held-out judge while tuning.

`--base FIELD=VALUE` changes the base's recipe (base.BaseRecipe, base_sd3.SD3Recipe): a base of its own is built
(minutes) into the cache, and the trial reports how often that base fails on the dev samples ("base_fails", the dev
classifier's p(digit) < 0.5), its headroom.

Pairs and the base's dev samples are made once per work directory, base and pairs-per-prompt, then reused.
One JSON line per trial is appended to WORK_DIR/results.jsonl (and printed).

The online stage is tuned the same way, from a finished demo's base and DPO-AI:

    python scripts/demo_tune.py --family sd3 --work-dir /tmp/tune-online --online DEMO_DIR \
        --set online_rounds=3 online_beta=1000 online_pairing=all

runs the demo's `iterate` (settings.online_config; its own evaluation on the pair prompts too) and scores the last round
against the base, against round 1 and against its start, and round 1 against the base, per image on the pair
prompts at `ONLINE_DEV_SEEDS`, under the crowd's utility, the AI reward and the dev classifier, at both settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from diffusion_dpo.demo import world
from diffusion_dpo.demo.parallel import Workers
from diffusion_dpo.demo.run import make_pairs, relabel_ai, train_job
from diffusion_dpo.demo.scorers import AI_REWARD, CROWD_REWARD, DEV_REWARD
from diffusion_dpo.demo.settings import (DEV_SEED_START, DEV_SEEDS, ONLINE_DEV_SEEDS, SIZES, DemoSize, sampling,
                                         train_config)
# the dev metric's scorers by their key in a trial's result (none of them is the judge)
DEV_REWARDS = {"crowd": CROWD_REWARD, "ai": AI_REWARD, "dev": DEV_REWARD}


def dev_prompts() -> list[dict]:
    """The 160 pair prompts (the phrasings the labels were collected on)."""
    return world.pair_prompts()


def failing_share(gen: Path) -> float:
    """The share of a generation run's images that do not show the prompted digit under the dev classifier
    (p_dev(digit) < report.FAIL_P, the report's failure rule with the dev classifier in the judge's place)."""
    import math

    from diffusion_dpo.demo.report import FAIL_P
    from diffusion_dpo.demo.scorers import dev_reward
    from diffusion_dpo.evaluation.compare import load_run
    from PIL import Image

    rows = load_run(gen)
    scores = dev_reward([Image.open(gen / r["file"]) for r in rows], [r["prompt"] for r in rows])
    return sum(score < math.log(FAIL_P) for score in scores) / len(scores)


def prepare_pairs(work: Path, size: DemoSize, base: Path) -> dict[str, Path]:
    """Crowd- and AI-labelled pairs for `size.pairs_per_prompt`, made by the demo's own stages (on the demo's
    workers, so that they are its pairs) once per work directory."""
    root = work / f"pairs-{size.family}-{size.pairs_per_prompt}-{size.base.key()}"
    done = root / "done"
    if not done.exists():
        with Workers() as workers:
            pairs = make_pairs(base, size, root, workers)
        relabel_ai(pairs.path, root)
        summary = json.dumps(dataclasses.asdict(pairs) | {"path": str(pairs.path)})
        print(summary)
        done.write_text(summary)
    return {"crowd": root / "crowd", "ai": root / "ai"}


def dev_score(work: Path, size: DemoSize, base: Path, model: Path, name: str) -> dict:
    """Win rates (per prompt and per image) and mean score gain of `model` over the base on the dev prompts and
    seeds, under the crowd's utility, the AI reward and the dev classifier, at the demo's sampling settings and at
    the pipeline's defaults (keys suffixed "_defaults"); diversity relative to the base at the demo's settings.
    The crowd's utility made the crowd's labels and shares its split with the AI reward: only the dev classifier
    (the base split) can tell a model that learnt the digits from one that learnt those scorers' quirks."""
    from diffusion_dpo.evaluation.diversity import diversity
    from diffusion_dpo.demo.settings import default_sampling
    from diffusion_dpo.evaluation.compare import compare
    from diffusion_dpo.evaluation.generate import generate

    seeds = [DEV_SEED_START + k for k in range(DEV_SEEDS)]
    scores: dict = {}
    for suffix, kwargs in (("", sampling(size)), ("_defaults", default_sampling(size))):
        base_gen = work / f"dev-base-{size.family}-{size.base.key()}{suffix}"
        generate(str(base), dev_prompts(), seeds, base_gen, **kwargs)  # resumes: a no-op once done
        scores[f"base_fails{suffix}"] = round(failing_share(base_gen), 3)
        gen = work / "runs" / name / f"dev{suffix}"
        generate(str(model), dev_prompts(), seeds, gen, **kwargs)
        result = compare(gen, base_gen, list(DEV_REWARDS.values()), work / "runs" / name / f"compare{suffix}",
                         batch_size=512)
        for key, reward in DEV_REWARDS.items():
            r = result["rewards"][reward]
            # The win rate saturates once a model improves nearly every prompt a little; the mean gain does not.
            scores |= {f"{key}{suffix}": round(r["win_rate"], 3), f"{key}_image{suffix}": round(r["image_win_rate"], 3),
                       f"{key}_gain{suffix}": round(r["mean_a"] - r["mean_b"], 4)}
        if not suffix:
            scores["diversity"] = round(diversity(gen) / diversity(base_gen), 3)
    return scores


def trial(work: Path, overrides: dict, labels: str, loss: str, name: str, family: str = "sd3",
          base_overrides: dict | None = None) -> dict:
    """Train one model of the `family` demo with `DemoSize` fields (and its base recipe's `base_overrides`)
    overridden and score it on the dev metric."""
    from diffusion_dpo.demo.cache import cached_base
    from diffusion_dpo.metrics import read_metrics, training_summary

    size = dataclasses.replace(SIZES[family]["full"], **overrides)
    if base_overrides:
        size = dataclasses.replace(size, base=dataclasses.replace(size.base, **base_overrides))
    base, _ = cached_base(size.base)
    data = prepare_pairs(work, size, base)[labels]
    started = time.perf_counter()
    run_dir = work / "runs" / name / "train"
    with Workers() as workers:  # trained as the demo trains it (a worker's threads), so it is the demo's model
        final = workers.map(train_job, [(train_config(base, data, run_dir, size, loss, labels),)])[0]
    summary = training_summary(read_metrics(run_dir))
    result = {"name": name, "family": family, "labels": labels, "loss": loss,
              **{f"base.{k}": v for k, v in (base_overrides or {}).items()}, **overrides,
              "train_s": round(time.perf_counter() - started, 1),
              "final_loss": round(summary["final_loss"], 3), "final_acc": round(summary["final_implicit_acc"], 3),
              **dev_score(work, size, base, final, name)}
    return _record(work, result)


def _record(work: Path, result: dict) -> dict:
    """Append a trial's result to WORK_DIR/results.jsonl and print it."""
    with open(work / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


def online_trial(work: Path, demo_dir: Path, overrides: dict, name: str, family: str = "sd3") -> dict:
    """Run the `family` demo's online stage from `demo_dir`'s base and DPO-AI with `DemoSize` fields overridden,
    and score it on the dev metric (module docstring)."""
    from diffusion_dpo.evaluation.diversity import diversity
    from diffusion_dpo.demo.settings import default_sampling, online_config
    from diffusion_dpo.evaluation.compare import compare
    from diffusion_dpo.evaluation.generate import generate
    from diffusion_dpo.iterate import iterate

    size = dataclasses.replace(SIZES[family]["full"], **overrides)
    prompts = work / "online_prompts.txt"
    prompts.write_text("".join(p["prompt"] + "\n" for p in dev_prompts()))
    run_dir = work / "runs" / name
    started = time.perf_counter()
    online = iterate(online_config(demo_dir / "base", demo_dir / "dpo_ai", prompts, prompts, run_dir / "online",
                                   size), log=lambda line: None)
    result: dict = {"name": name, "family": family, "online": True, **overrides,
                    "iterate_s": round(time.perf_counter() - started, 1)}
    models = {"base": demo_dir / "base", "start": demo_dir / "dpo_ai", "r1": Path(online["rounds"][0]["final"]),
              "last": Path(online["final"])}
    for setting, kwargs in (("demo", sampling(size)), ("defaults", default_sampling(size))):
        gens = {}
        for model, path in models.items():
            shared = model in ("base", "start")  # the same for every trial of this demo
            gens[model] = (work / f"online-{model}-{family}-{setting}") if shared else run_dir / "dev" / setting / model
            generate(str(path), dev_prompts(), ONLINE_DEV_SEEDS, gens[model], **kwargs)
        for a, b in (("last", "base"), ("last", "r1"), ("last", "start"), ("r1", "base")):
            got = compare(gens[a], gens[b], list(DEV_REWARDS.values()),
                          run_dir / "compare" / setting / f"{a}_vs_{b}", batch_size=512)
            result |= {f"{setting}_{a}_vs_{b}_{key}": round(got["rewards"][reward]["image_win_rate"], 3)
                       for key, reward in DEV_REWARDS.items()}
        result[f"{setting}_diversity"] = round(diversity(gens["last"]) / diversity(gens["base"]), 3)
        # the dev classifier's failing share of the base and of the last round (the halving target's dev twin)
        result |= {f"{setting}_fails_{m}": round(failing_share(gens[m]), 3) for m in ("base", "last")}
    return _record(work, result)


def _value(text: str):
    if text.lower() in ("true", "false"):  # a flag such as online_at_defaults=false (a string would be truthy)
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="DemoSize fields to override")
    parser.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="base recipe fields to override (a base of its own is built)")
    parser.add_argument("--family", choices=tuple(SIZES), default="sd3")
    parser.add_argument("--labels", choices=("crowd", "ai"), default="crowd")
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--name", help="trial name (default: from the overrides)")
    parser.add_argument("--online", type=Path, metavar="DEMO_DIR",
                        help="tune the online stage, from this finished demo's base and DPO-AI")
    args = parser.parse_args(argv)
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    base_overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.base)}
    fields = {f.name for f in dataclasses.fields(DemoSize)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        parser.error(f"unknown DemoSize field(s): {', '.join(unknown)}")
    recipe_fields = {f.name for f in dataclasses.fields(SIZES[args.family]["full"].base)}
    unknown = sorted(set(base_overrides) - recipe_fields)
    if unknown:
        parser.error(f"unknown base recipe field(s): {', '.join(unknown)}")
    if base_overrides and args.online:
        parser.error("--base applies to training trials; --online takes the base of its DEMO_DIR")
    kind = ["online"] if args.online else [args.labels, args.loss]
    name = args.name or "-".join(kind + [f"base.{k}{v}" for k, v in base_overrides.items()]
                                 + [f"{k}{v}" for k, v in overrides.items()])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.online:
        online_trial(args.work_dir, args.online, overrides, name, args.family)
    else:
        trial(args.work_dir, overrides, args.labels, args.loss, name, args.family, base_overrides)


if __name__ == "__main__":
    main()
