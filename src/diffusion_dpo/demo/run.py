"""`diffusion-dpo demo`: the whole method, offline, on a CPU, in minutes.

    diffusion-dpo demo --output-dir demo                  # flow matching: StableDiffusion3Pipeline (Flow-DPO)
    diffusion-dpo demo --family sd --output-dir demo-sd   # UNet: StableDiffusionPipeline

Stages (one progress bar each, wall time of each in report.json; the pairs', the trainings' and the evaluation's
independent jobs run side by side on two worker processes, demo/parallel.py):

    base       build (or take from the cache) the base pipeline (demo/base.py, base_sd3.py) -> DIR/base/
    pairs      `generate` 2K images per pair prompt from the base; the hidden crowd labels each
               pair by Bradley-Terry with ties                                       -> DIR/data/crowd/
    relabel    `relabel` the same pairs with the AI reward (AI feedback)             -> DIR/data/ai/
    train      `train`: Diffusion-DPO on crowd labels, on AI labels, and the SFT baseline
                                                                                    -> DIR/dpo, dpo_ai, sft
    online     `iterate`: on-policy rounds from DPO-AI, the AI reward labelling the model's own samples
               (every pair of K per pair prompt), the reference refreshed every round; the crowd's
               utility and the dev classifier are its held-out rewards       -> DIR/online/, DIR/dpo_online
    generate   `generate` every model on the held-out prompts and seeds, at the demo's sampling
               settings and at the pipeline's default steps and guidance (at the trained T5 length)
                                                                      -> DIR/eval/gen/, gen_defaults/
    compare    `compare` each model with the base (and DPO with SFT) under the held-out judge,
               the AI reward and the crowd's utility, at both settings  -> DIR/eval/compare/, compare_defaults/
    report     report.json, report.md and the PNGs

Nothing here re-implements the library: the demo is a user of `train`, `generate`, `relabel`
and `compare`, with its own rewards passed by import path. The judge's split feeds nothing but
the judge (world.py, scorers.py).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from diffusion_dpo.config import Config
from diffusion_dpo.demo import world
from diffusion_dpo.demo.parallel import Workers
from diffusion_dpo.demo.scorers import AI_REWARD, CROWD_REWARD, JUDGE_REWARD
from diffusion_dpo.demo.settings import (FAMILIES, MODELS, OUTPUTS, SIZES, DemoSize, default_sampling, online_config,
                                         sampling, train_config)
from diffusion_dpo.errors import UserError

if TYPE_CHECKING:
    from diffusion_dpo.demo.pairs import PairSet

JUDGES = {"judge": JUDGE_REWARD, "ai": AI_REWARD, "crowd": CROWD_REWARD}  # report name -> reward


def make_pairs(base: Path, size: DemoSize, data_dir: Path, workers: Optional[Workers] = None) -> PairSet:
    """The pairs stage: sample 2K images per pair prompt from `base` into data_dir/base_samples and let the
    crowd label them into data_dir/crowd. With `workers`, the pairs are split over them (pair k, seeds 2k and
    2k+1, into base_samples/part-<k mod n>)."""
    from diffusion_dpo.demo.pairs import label_pairs, pair_seeds
    from diffusion_dpo.evaluation.compare import load_run

    gen_dir = data_dir / "base_samples"
    parts = min(workers.workers if workers is not None else 1, size.pairs_per_prompt)
    seeds = pair_seeds(size.pairs_per_prompt)
    runs = [gen_dir if parts == 1 else gen_dir / f"part-{j}" for j in range(parts)]
    prompts = world.pair_prompts(size.pair_templates)
    jobs = [(str(base), prompts, [s for s in seeds if (s // 2) % parts == j], run, sampling(size))
            for j, run in enumerate(runs)]
    run_jobs(workers or Workers(1), generate_job, jobs, "pair samples")
    rows = [r | {"file": str(run.relative_to(gen_dir) / r["file"])} for run in runs for r in load_run(run)]
    return label_pairs(gen_dir, rows, data_dir / "crowd", seed=size.base.seed)


def run_jobs(workers: Workers, fn: Any, jobs: list[tuple], desc: str) -> list:
    """`workers.map(fn, jobs)` under one progress bar over the jobs (the workers draw none)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="job") as bar:
        return workers.map(fn, jobs, done=lambda: bar.update(1))


def generate_job(model: str, prompts: list, seeds: list, out: Path, kwargs: dict) -> Path:
    """`generate` as a job for `Workers.map`."""
    from diffusion_dpo.evaluation.generate import generate

    return generate(model, prompts, seeds, out, **kwargs)


def train_job(cfg: Config) -> Path:
    """`train` as a job for `Workers.map`; returns final/."""
    from diffusion_dpo.training.trainer import train

    return train(cfg)


def cache_job(cfg: Config) -> None:
    """The pre-encoding cache a `train` config names, as a job for `Workers.map` (built once, before the
    trainings that share it start)."""
    from diffusion_dpo.cache.build import build_cache

    build_cache(cfg.model, cfg.data, cfg.cache, cfg.flow)


def relabel_ai(crowd_dir: Path, data_dir: Path) -> dict:
    """The relabel stage: the same pairs labelled by the AI reward into data_dir/ai; returns relabel's report."""
    from diffusion_dpo.evaluation.relabel import relabel

    # margin 0: the higher-scoring image wins, as in the paper's AI feedback. The AI reward is confident on
    # most digits, so a margin as small as 0.05 nats already called 70% of the pairs ties.
    return relabel(crowd_dir, AI_REWARD, data_dir / "ai", margin=0.0, batch_size=256)


def _resolved(run_dir: Path) -> dict:
    """The sampling settings a generation run actually used (run.json): steps, guidance, T5 length, sampler."""
    run = json.loads((run_dir / "run.json").read_text())
    return {k: run[k] for k in ("steps", "guidance_scale", "max_sequence_length", "scheduler")}


class StageTimer:
    """Wall time per stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)


def prepare_output(out: Path, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Refuse a directory that holds anything but an earlier demo's `outputs`; clear those."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir '{out}' is a file")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in outputs)
        if foreign:
            raise UserError(f"--output-dir '{out}' holds files that are not the demo's ({', '.join(foreign[:3])}); "
                            "choose an empty or new directory")
        for name in outputs:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output-dir '{out}': {exc.strerror or exc}") from None


def eval_items(size: DemoSize) -> list[dict]:
    """The held-out evaluation prompts (the evaluation templates' phrasings of every digit), as generate's items."""
    return [{"prompt": p, "digit": d} for d in range(10)
            for p in world.phrasings(d, world.EVAL_TEMPLATES[:size.eval_templates])]


def eval_seeds(size: DemoSize) -> list[int]:
    """The evaluation seeds (far from the pair, online and tuning seeds)."""
    return [world.EVAL_SEED_START + k for k in range(size.eval_seeds)]


def resolve_size(size: str | DemoSize, family: str) -> tuple[str, DemoSize]:
    """(its name, the DemoSize) for a size name of `family`, or a DemoSize given as is ("custom")."""
    if not isinstance(size, str):
        return "custom", size
    if family not in SIZES:
        raise UserError(f"unknown demo family '{family}'; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES[family]:
        raise UserError(f"unknown demo size '{size}'; choose one of {', '.join(SIZES[family])}")
    return size, SIZES[family][size]


def base_stage(size: DemoSize, out: Path, cache_dir: Optional[Path], rebuild: bool) -> tuple[Path, Path, bool]:
    """The base stage: the cached base (built if missing) copied to out/base; (out/base, the cache entry, built now)."""
    from diffusion_dpo.demo.cache import cached_base

    with _tqdm(size.base.total_steps(), "base model") as bar:
        cached, built = cached_base(size.base, cache_dir, rebuild, bar.update)
        bar.update(bar.total - bar.n)  # a cached base skips the bar to its end
    base = out / "base"
    shutil.copytree(cached, base)
    return base, cached, built


def _tqdm(total: int, desc: str):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=0.1 if sys.stderr.isatty() else 30.0)


def run_demo(output_dir: str | Path, size: str | DemoSize = "full", cache_dir: Optional[Path] = None,
             rebuild: bool = False, family: str = "sd3") -> dict:
    """Run every stage into `output_dir` for the base model `family` ("sd": UNet, "sd3": flow matching; a
    DemoSize given as `size` carries its own); return the report (also written as report.json)."""
    from diffusion_dpo.demo.report import write_report
    from diffusion_dpo.evaluation.compare import compare
    from diffusion_dpo.iterate import iterate

    size_name, size = resolve_size(size, family)
    out = Path(output_dir)
    prepare_output(out)
    timer = StageTimer()
    started = time.perf_counter()
    sample = sampling(size)
    with Workers() as workers:  # spawned now: their imports overlap the base stage
        with timer("base"):
            base, cached, built = base_stage(size, out, cache_dir, rebuild)

        with timer("pairs"):
            crowd = make_pairs(base, size, out / "data", workers)

        with timer("relabel"):
            ai = relabel_ai(crowd.path, out / "data")

        trainings = {"dpo": (crowd.path, "dpo", "crowd"), "dpo_ai": (out / "data" / "ai", "dpo", "ai"),
                     "sft": (crowd.path, "sft", "crowd")}
        configs = {name: train_config(base, data, out / "train" / name, size, loss, labels)
                   for name, (data, loss, labels) in trainings.items()}
        with timer("train"):
            # each data set's cache first (DPO and SFT share the crowd's), then the trainings side by side
            run_jobs(workers, cache_job, [(configs["dpo"],), (configs["dpo_ai"],)], "pre-encoding caches")
            finals = run_jobs(workers, train_job, [(cfg,) for cfg in configs.values()], "trainings")
        runs = {}
        for name, final in zip(configs, finals):
            final.rename(out / name)  # a full pipeline directory: from_pretrained(DIR/<name>)
            runs[name] = out / "train" / name

        items = eval_items(size)
        with timer("online"):  # rounds in turn, in this process (all its cores)
            prompts_file, dev_file = out / "data" / "online_prompts.txt", out / "data" / "online_dev_prompts.txt"
            prompts_file.write_text("".join(p["prompt"] + "\n" for p in world.pair_prompts(size.pair_templates)))
            dev_file.write_text("".join(p["prompt"] + "\n" for p in items))
            online = iterate(online_config(base, out / "dpo_ai", prompts_file, dev_file, out / "online", size),
                             log=lambda line: None)
            shutil.copytree(online["final"], out / "dpo_online")  # the last round's pipeline directory
            round_1 = Path(online["rounds"][0]["final"])
            runs["dpo_online"] = Path(online["final"]).parent
        seeds = eval_seeds(size)
        (out / "eval_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in items))
        settings = {"demo": ("gen", "compare", sample), "defaults": ("gen_defaults", "compare_defaults",
                                                                      default_sampling(size))}
        gens: dict[str, dict[str, Path]] = {
            setting: {name: out / "eval" / gen_dir / name for name in ("base", *MODELS, "online_round_1")}
            for setting, (gen_dir, _, _) in settings.items()}
        with timer("generate"):
            run_jobs(workers, generate_job, [(str(round_1 if name == "online_round_1" else out / name), items, seeds,
                                              path, settings[setting][2])
                                             for setting in settings for name, path in gens[setting].items()],
                     "evaluation samples")

    comparisons: dict[str, dict[str, dict]] = {}
    with timer("compare"):
        for setting, (_, cmp_dir, _) in settings.items():
            g = gens[setting]
            comparisons[setting] = {
                f"{a}_vs_{b}": compare(g[a], g[b], list(JUDGES.values()), out / "eval" / cmp_dir / f"{a}_vs_{b}",
                                       batch_size=512)
                for a, b in [(m, "base") for m in MODELS] + [("dpo", "sft"), ("dpo_ai", "dpo"),
                                                             ("dpo_online", "online_round_1")]}

    facts = {"family": size.family, "size": size_name, "settings": asdict(size),
             "sampling": {setting: _resolved(gens[setting]["base"]) for setting in settings},
             "base_built_now": built, "base_cache": str(cached),
             "pair_prompts": len(world.pair_prompts(size.pair_templates)), "pairs_per_prompt": size.pairs_per_prompt,
             "crowd_pairs": {**asdict(crowd), "path": str(crowd.path)}, "ai_relabel": ai, "eval_seeds": seeds,
             "online": {"rounds": online["rounds"], "stopped": online["stopped"], "final": online["final"]}}
    return write_report(out, facts, comparisons, gens, runs, timer, JUDGES, started)
