"""`diffusion-dpo demo --losses dpo,ipo,kto,mapo`: the preference family side by side, on the same crowd labels.

    base       the demo's base model (the same cache as `demo`)                          -> DIR/base/
    pairs      the demo's crowd pairs: 2K base samples per pair prompt, crowd labels      -> DIR/data/crowd/
    train_*    one full fine-tune per loss, each in its own process (so that its peak memory is its own):
               the demo's DPO settings with only the objective changed (loss_config)     -> DIR/<loss>/
    generate   the base and every tuned model on the held-out prompts and seeds, at the demo's sampling
               settings and at the pipeline's own defaults                  -> DIR/eval/gen*/
    compare    each tuned model against the base under the held-out judge, the AI reward and the crowd's
               utility (prompts the unit, paired bootstrap; per-image win rates with intervals)
    report     losses.json, losses.md, loss_win_rates.png

Every loss trains on the same pairs, for the same steps, with the same images per step, learning rate and seed:
KTO sees each decided pair as its two images, the winner desirable and the loser undesirable (data.unpaired),
at twice the items per batch. Each loss's beta is set a priori from its own convention (loss_config), never
chosen on the judge. The default `demo` is untouched by this module.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from diffusion_dpo.config import Config, load_config, to_yaml, validate
from diffusion_dpo.demo.run import (StageTimer, base_stage, eval_items, eval_seeds, generate_job, make_pairs,
                                    prepare_output, resolve_size, run_jobs)
from diffusion_dpo.demo.report import SETTINGS
from diffusion_dpo.demo.settings import DemoSize, default_sampling, sampling, train_config
from diffusion_dpo.demo.parallel import Workers
from diffusion_dpo.demo.scorers import AI_REWARD, CROWD_REWARD, JUDGE_REWARD
from diffusion_dpo.errors import UserError
from diffusion_dpo.training.losses import LOSSES, get_loss

JUDGES = {"judge": JUDGE_REWARD, "ai": AI_REWARD, "crowd": CROWD_REWARD}
OUTPUTS = ("base", "data", "train", "eval", "eval_prompts.jsonl", "losses.json", "losses.md", "loss_win_rates.png",
           *LOSSES)


def parse_losses(text: str) -> list[str]:
    """'dpo,ipo,kto,mapo' -> the names, each a registry loss, in order, without repeats; a one-line error else."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--losses: give at least one loss, e.g. --losses dpo,ipo,kto,mapo")
    for name in names:
        get_loss(name)  # an unknown name: a one-line error naming the choices
    if len(set(names)) != len(names):
        raise UserError(f"--losses '{text}': a loss is named twice")
    return names


def loss_config(base: Path, crowd: Path, out: Path, size: DemoSize, loss: str) -> Config:
    """The `train` config of one loss: the demo's DPO-on-crowd config (`run.train_config`) with the objective
    changed, and what that objective needs to see the same data at the same scale:

        dpo, hinge, sft   beta as DPO's (the demo's crowd beta)
        ipo               beta as DPO's: our IPO regresses h to 1/(2 beta), where DPO's sigmoid saturates
                          (beta h ~ 1), so the same beta asks for the same margin
        kto               data.unpaired (each decided pair -> winner desirable, loser undesirable), batch of
                          2x items (the same images per step), beta = beta_DPO / 2 (DPO puts 0.5 beta on each
                          image's error difference; see losses.kto_loss)
        mapo              beta 0.1, the authors' default (MaPO's beta weighs its margin term, not a KL)

    All set before any judge was run on them.
    """
    cfg = train_config(base, crowd, out, size, "dpo", "crowd")
    spec = get_loss(loss)
    cfg.loss.name = loss
    if spec.unpaired:
        cfg.data.unpaired = True
        cfg.data.batch_size = 2 * size.batch_size
        cfg.loss.beta = size.beta / 2
        cfg.cache.dir = str(crowd.with_name(f"{crowd.name}-unpaired-cache"))  # another item list: its own cache
    elif loss == "mapo":
        cfg.loss.beta = 0.1
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- one training, in its own process

def train_measured(cfg: Config) -> dict[str, Any]:
    """Train `cfg` here and measure it: median step time after 3 warm-up steps, training's peak memory (CUDA's
    max_memory_allocated, or on the CPU the rise of the peak resident set over its size once the model is
    loaded, bench's measure), measured at the last optimizer step so that saving the pipeline does not count."""
    from diffusion_dpo.metrics import peak_bytes, reset_peak_memory, rss_bytes
    from diffusion_dpo.metrics import read_metrics
    from diffusion_dpo.training.trainer import Trainer

    rss_before = rss_bytes()
    reset_peak_memory()
    peaks: list[int] = []
    trainer = Trainer(cfg, callback=lambda metrics: peaks.append(peak_bytes(rss_before)))
    load_peak = peak_bytes(rss_before)
    reset_peak_memory()
    peaks.clear()
    final = trainer.run()
    rows = read_metrics(trainer.output_dir)
    timed = rows[min(3, len(rows) - 1):]
    step_s = statistics.median(trainer.pairs_per_step / r["pairs_per_s"] for r in timed)
    return {"final": str(final), "device": str(trainer.accelerator.device), "step_s": step_s,
            "items_per_step": trainer.pairs_per_step, "images_per_step": trainer.pairs_per_step * trainer.images_per_item,
            "reference_model": getattr(trainer.reference, "copy", None) is not None,  # a frozen second denoiser
            "peak_memory_mib": max(peaks) / 2**20 if peaks else None, "load_peak_memory_mib": load_peak / 2**20}


def train_in_child(cfg: Config, run_dir: Path, threads: int) -> dict[str, Any]:
    """`train_measured` in a fresh `python -m diffusion_dpo.demo.losses` process (its own peak memory) of
    `threads` torch threads (the demo's workers', so that its DPO is the demo's); its output goes to
    run_dir/train.log. A failure is one line: the child's last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file, result_file, log_file = run_dir / "demo_config.yaml", run_dir / "measured.json", run_dir / "train.log"
    config_file.write_text(to_yaml(cfg))
    result_file.unlink(missing_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "diffusion_dpo.demo.losses", str(config_file), str(result_file),
                               str(threads)], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        lines = log_file.read_text().strip().splitlines() or ["no output"]
        raise UserError(f"demo --losses: training {cfg.loss.name} failed ({log_file}): {lines[-1]}")
    return json.loads(result_file.read_text())


def _worker(argv: Sequence[str]) -> None:
    """Child entry: config_file result_file threads."""
    import os

    import torch

    from diffusion_dpo.console import quiet_libraries, quiet_progress_bars

    config_file, result_file, threads = argv
    torch.set_num_threads(int(threads))
    quiet_libraries()
    quiet_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")
    Path(result_file).write_text(json.dumps(train_measured(load_config(config_file))))


# ---------------------------------------------------------------- the run

def run_loss_demo(output_dir: str | Path, losses: Sequence[str], size: str | DemoSize = "full",
                  cache_dir: Optional[Path] = None, rebuild: bool = False, family: str = "sd3",
                  log=print) -> dict:
    """Train each of `losses` on the demo's crowd pairs and compare each with the base; return the report (also
    DIR/losses.json, losses.md and loss_win_rates.png)."""
    from diffusion_dpo.evaluation.compare import compare

    size_name, size = resolve_size(size, family)
    out = Path(output_dir)
    prepare_output(out, OUTPUTS)
    timer, started = StageTimer(), time.perf_counter()
    items, seeds = eval_items(size), eval_seeds(size)
    settings = {"demo": ("gen", "compare", sampling(size)), "defaults": ("gen_defaults", "compare_defaults",
                                                                           default_sampling(size))}
    with Workers() as workers:  # the default demo's, so that the pairs and DPO are its own
        with timer("base"):
            base, cached, built = base_stage(size, out, cache_dir, rebuild)
        with timer("pairs"):
            crowd = make_pairs(base, size, out / "data", workers)
        measured: dict[str, dict] = {}
        for loss in losses:  # each in its own process, in turn: its step time and memory its own
            with timer(f"train_{loss}"):
                log(f"demo --losses: training {loss} ({get_loss(loss).title})")
                run_dir = out / "train" / loss
                measured[loss] = train_in_child(loss_config(base, crowd.path, run_dir, size, loss), run_dir,
                                                workers.threads)
                Path(measured[loss]["final"]).rename(out / loss)  # a full pipeline: from_pretrained(DIR/<loss>)

        (out / "eval_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in items))
        gens = {setting: {name: out / "eval" / gen_dir / name for name in ("base", *losses)}
                for setting, (gen_dir, _, _) in settings.items()}
        with timer("generate"):
            run_jobs(workers, generate_job, [(str(out / name), items, seeds, path, kwargs)
                                             for setting, (_, _, kwargs) in settings.items()
                                             for name, path in gens[setting].items()], "evaluation samples")

    comparisons: dict[str, dict[str, dict]] = {}
    with timer("compare"):
        for setting, (_, cmp_dir, _) in settings.items():
            g = gens[setting]
            comparisons[setting] = {loss: compare(g[loss], g["base"], list(JUDGES.values()),
                                                  out / "eval" / cmp_dir / f"{loss}_vs_base", batch_size=512)
                                    for loss in losses}
    facts = {"family": size.family, "size": size_name, "losses": list(losses), "base_built_now": built,
             "base_cache": str(cached), "crowd_pairs": crowd.pairs, "eval_prompts": len(items), "eval_seeds": seeds,
             "settings": {loss: _settings_of(out / "train" / loss) for loss in losses}}
    return write_loss_report(out, facts, comparisons, gens, measured, timer, started)


def _settings_of(run_dir: Path) -> dict:
    """What differs between the losses' trainings, read back from the config each ran."""
    cfg = load_config(run_dir / "demo_config.yaml")
    return {"loss": cfg.loss.name, "beta": cfg.loss.beta, "unpaired": cfg.data.unpaired,
            "batch_items": cfg.data.batch_size, "steps": cfg.train.max_steps, "lr": cfg.optim.lr}


# ---------------------------------------------------------------- the report

def write_loss_report(out: Path, facts: dict, comparisons: dict[str, dict[str, dict]], gens: dict[str, dict[str, Path]],
                      measured: dict[str, dict], timer: StageTimer, started: float) -> dict:
    """losses.json, losses.md and loss_win_rates.png from the comparisons and the measured trainings."""
    from diffusion_dpo.demo.report import FAIL_P, plot_win_rates, result
    from diffusion_dpo.evaluation.diversity import diversity
    from diffusion_dpo.evaluation.compare import score_run
    from diffusion_dpo.metrics import read_metrics, training_summary

    losses = facts["losses"]
    with timer("report"):
        judged = {st: {j: {loss: result(cmp[loss], JUDGES[j]) for loss in losses} for j in JUDGES}
                  for st, cmp in comparisons.items()}
        div, failures = {}, {}
        for st, g in gens.items():
            d = {name: diversity(path) for name, path in g.items()}
            div[st] = {**d, "ratio_to_base": {loss: d[loss] / d["base"] for loss in losses}}
            judge_scores = {name: score_run(path, [JUDGE_REWARD])[JUDGE_REWARD] for name, path in g.items()}
            failures[st] = {name: float(np.mean(s < np.log(FAIL_P))) for name, s in judge_scores.items()}
        training = {loss: {**training_summary(read_metrics(out / "train" / loss)), **measured[loss]}
                    for loss in losses}
        plot_win_rates(out / "loss_win_rates.png", judged, {loss: loss for loss in losses})
    report = {**facts, "judges": JUDGES, "win_rates_vs_base": judged, "diversity": div, "failure_share": failures,
              "training": training, "wall_time_s": {**timer.seconds, "total": round(time.perf_counter() - started, 2)}}
    (out / "losses.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "losses.md").write_text(loss_markdown(report))
    return report


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def loss_markdown(report: dict) -> str:
    """losses.md: per sampling setting, one row per loss against the base; then what each training cost."""
    losses = report["losses"]
    first = report["win_rates_vs_base"]["demo"]["judge"][losses[0]]
    lines = [f"# The preference family on the same crowd labels ({report['family']} base)", "",
             f"{report['crowd_pairs']} crowd pairs; every loss trained on them with the same steps, learning rate, "
             "seed and images per step, its beta set a priori (demo/losses.py, loss_config). Each tuned model "
             f"against the base on {report['eval_prompts']} held-out prompts x {len(report['eval_seeds'])} seeds = "
             f"{first['n_images']} images. Win rate per image with its 95% interval; the mean score difference "
             "(log-probability of the prompted digit under the judge) with its interval and effect size d_z "
             "(prompts the unit); failures: images whose prompted digit the judge gives p < 0.5.", ""]
    for st, per_judge in report["win_rates_vs_base"].items():
        lines += [f"## {SETTINGS[st]}", "",
                  "| loss | judge: win rate per image [95% CI] | judge: mean diff [95% CI] | d_z | AI: win rate | "
                  "crowd: win rate | failures (base) | diversity / base |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        fail = report["failure_share"][st]
        for loss in losses:
            j, a, c = (per_judge[k][loss] for k in ("judge", "ai", "crowd"))
            lines.append(
                f"| {loss} | {j['image_win_rate']:.3f} [{j['image_ci_low']:.3f}, {j['image_ci_high']:.3f}] | "
                f"{j['mean_diff']:+.3f} [{j['mean_diff_ci_low']:+.3f}, {j['mean_diff_ci_high']:+.3f}] | "
                f"{_fmt(j['effect_size'], '.2f')} | {a['image_win_rate']:.3f} | {c['image_win_rate']:.3f} | "
                f"{fail[loss]:.3f} ({fail['base']:.3f}) | {report['diversity'][st]['ratio_to_base'][loss]:.3f} |")
        lines.append("")
    lines += ["## What each training cost", "",
              "| loss | beta | items / step | images / step | reference model | step (ms) | peak memory (MiB) | "
              "final loss | implicit acc |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for loss in losses:
        t, s = report["training"][loss], report["settings"][loss]
        lines.append(f"| {loss} | {s['beta']:g} | {t['items_per_step']} | {t['images_per_step']} | "
                     f"{'yes' if t['reference_model'] else 'no'} | {1000 * t['step_s']:.1f} | "
                     f"{_fmt(t['peak_memory_mib'], '.0f')} | {_fmt(t['final_loss'], '.4f')} | "
                     f"{_fmt(t['final_implicit_acc'], '.3f')} |")
    device = next(iter(report["training"].values()))["device"]
    lines += ["", f"Step: median wall time per optimizer step after 3 warm-up steps. Peak memory on {device}: "
              + ("max_memory_allocated" if device.startswith("cuda") else
                 "the rise of the peak resident set over its size after loading")
              + ", at the last step, each loss in its own process.", "",
              "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_time_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    _worker(sys.argv[1:])
