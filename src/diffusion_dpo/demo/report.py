"""The demo's report: report.json, report.md and four PNGs, from what the stages wrote.

    report.json   per judge, per model vs base: win rate, 95% CI, n prompts, p; DPO vs SFT and
                  DPO-AI vs DPO head to head; mean scores; diversity; training summaries; the
                  targets with pass/fail; wall time per stage
    report.md     the same as tables
    win_rates.png            win rate over the base with its 95% interval, per judge and model
    training_curves.png      loss, implicit accuracy and reward margin per optimizer step
    score_distributions.png  histograms of the held-out judge's scores per model
    grid.png                 base | DPO | DPO-AI | SFT on the same prompts and seeds

Win rates come from `evaluation.compare` (prompts are the unit, seeds averaged, paired bootstrap);
nothing is recomputed here except diversity, which `compare` does not measure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from diffusion_dpo.evaluation.diversity import diversity
from diffusion_dpo.metrics import read_metrics, training_summary
from diffusion_dpo.evaluation.plots import pyplot

LABELS = {"base": "base", "dpo": "DPO", "dpo_ai": "DPO-AI", "sft": "SFT", "dpo_online": "DPO-online"}
NAMES = {**LABELS, "online_round_1": "online round 1"}  # also the models that appear only head to head
GRID_SEEDS = 3


# "defaults": the pipeline's own steps and guidance, at the T5 length the flow model was trained at (12 tokens, not
# the pipeline's 256: a plain `pipe(prompt)` pads to 256; docs/demo.md gives that row too)
SETTINGS = {"demo": "the demo's sampling settings", "defaults": "the pipeline's default steps and guidance"}
FAIL_P = 0.5  # an image "fails to show the prompted digit" when the judge gives that digit p < 0.5


def _targets(judged: dict, head: dict, div: dict, failures: dict) -> dict:
    """The issues' targets, each with its measured value and whether it is met: per image (prompt, seed) under the
    held-out judge, at the demo's sampling settings and at the pipeline's defaults."""
    targets = {}
    for setting in judged:
        j, h, d = judged[setting]["judge"], head[setting]["dpo_vs_sft"]["judge"], div[setting]["ratio_to_base"]
        targets |= {
            f"{setting}: dpo_image_win_rate_ge_0.70": {"value": j["dpo"]["image_win_rate"],
                                                       "met": j["dpo"]["image_win_rate"] >= 0.70},
            f"{setting}: dpo_image_ci_low_gt_0.65": {"value": j["dpo"]["image_ci_low"],
                                                     "met": j["dpo"]["image_ci_low"] > 0.65},
            f"{setting}: dpo_ai_within_0.05_of_dpo": {
                "value": j["dpo_ai"]["image_win_rate"] - j["dpo"]["image_win_rate"],
                "met": abs(j["dpo_ai"]["image_win_rate"] - j["dpo"]["image_win_rate"]) <= 0.05},
            f"{setting}: dpo_above_sft": {"value": h["image_win_rate"],
                                          "met": j["dpo"]["image_win_rate"] > j["sft"]["image_win_rate"]
                                          and h["image_win_rate"] > 0.5},
            f"{setting}: dpo_diversity_ge_0.8_of_base": {"value": d["dpo"], "met": d["dpo"] >= 0.8},
        }
        if "dpo_online" in j:
            o, r1 = j["dpo_online"], head[setting]["dpo_online_vs_online_round_1"]["judge"]
            fail = failures[setting]
            best = min((m for m in fail if m != "base"), key=lambda m: fail[m])
            targets |= {
                f"{setting}: online_image_win_rate_ge_0.85": {"value": o["image_win_rate"],
                                                              "met": o["image_win_rate"] >= 0.85},
                f"{setting}: online_vs_round_1_ge_0.65": {"value": r1["image_win_rate"],
                                                          "met": r1["image_win_rate"] >= 0.65},
                f"{setting}: best_model_halves_failures ({LABELS[best]})": {
                    "value": fail[best] / fail["base"] if fail["base"] else 0.0,
                    "met": fail[best] <= 0.5 * fail["base"]},
                f"{setting}: online_diversity_ge_0.8_of_base": {"value": d["dpo_online"], "met": d["dpo_online"] >= 0.8},
            }
    return targets


def result(cmp: dict, reward: str) -> dict:
    """One comparison's figures under one reward (compare's output, trimmed to what the reports show)."""
    r = cmp["rewards"][reward]
    return {"win_rate": r["win_rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n_prompts"],
            "p_value": r["p_value"], "wins": r["wins"], "ties": r["ties"], "losses": r["losses"],
            "image_win_rate": r["image_win_rate"], "image_ci_low": r["image_ci_low"],
            "image_ci_high": r["image_ci_high"], "n_images": r["n_images"], "effect_size": r["effect_size"],
            "mean_model": r["mean_a"], "mean_other": r["mean_b"], "mean_diff": r["mean_diff"],
            "mean_diff_ci_low": r["mean_diff_ci_low"], "mean_diff_ci_high": r["mean_diff_ci_high"]}


def write_report(out: Path, facts: dict, comparisons: dict[str, dict[str, dict]], gens: dict[str, dict[str, Path]],
                 runs: dict[str, Path], timer: Callable, judges: dict[str, str], started: float) -> dict:
    """Write report.json, report.md and the PNGs into `out` (timed as the 'report' stage); return the report.
    `comparisons` and `gens` hold one entry per sampling setting ("demo", "defaults")."""
    from diffusion_dpo.evaluation.compare import score_run

    with timer("report"):
        models = [m for m in LABELS if m != "base"]
        judged = {st: {j: {m: result(cmp[f"{m}_vs_base"], judges[j]) for m in models} for j in judges}
                  for st, cmp in comparisons.items()}
        head = {st: {k: {j: result(cmp[k], judges[j]) for j in judges} for k in cmp if not k.endswith("_vs_base")}
                for st, cmp in comparisons.items()}
        scores = {st: {name: score_run(g[name], list(judges.values())) for name in LABELS}  # cached by compare
                  for st, g in gens.items()}
        mean_scores = {st: {j: {name: float(np.mean(sc[name][judges[j]])) for name in LABELS} for j in judges}
                       for st, sc in scores.items()}
        failures = {st: {name: float(np.mean(sc[name][judges["judge"]] < np.log(FAIL_P))) for name in LABELS}
                    for st, sc in scores.items()}
        div = {}
        for st, g in gens.items():
            d = {name: diversity(g[name]) for name in LABELS}
            div[st] = {**d, "ratio_to_base": {m: d[m] / d["base"] for m in models}}
        training = {name: training_summary(read_metrics(path)) for name, path in runs.items()}
        plot_win_rates(out / "win_rates.png", judged)
        _plot_curves(out / "training_curves.png", {name: read_metrics(path) for name, path in runs.items()})
        _plot_scores(out / "score_distributions.png", {name: scores["demo"][name][judges["judge"]] for name in LABELS})
        _grid(gens["demo"]).save(out / "grid.png")
    report = {**facts, "judges": {j: judges[j] for j in judges}, "win_rates_vs_base": judged, "head_to_head": head,
              "mean_scores": mean_scores, "failure_share": failures, "diversity": div, "training": training,
              "targets": _targets(judged, head, div, failures),
              "wall_time_s": {**timer.seconds, "total": round(time.perf_counter() - started, 2)}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _setting_line(name: str, used: dict) -> str:
    t5 = f", T5 length {used['max_sequence_length']}" if used.get("max_sequence_length") else ""
    return (f"**{SETTINGS[name]}** ({used['scheduler']}, {used['steps']} steps, guidance {used['guidance_scale']:g}"
            f"{t5})")


def markdown(report: dict) -> str:
    """report.md: win rates per sampling setting, head-to-head, failures, diversity, targets, training, timings."""
    any_setting = next(iter(report["win_rates_vs_base"].values()))
    n = any_setting["judge"]["dpo"]
    lines = [f"# Diffusion-DPO demo ({report['family']} base)", "",
             f"Held-out evaluation: {n['n']} prompts (phrasings never used in the preference data) x "
             f"{len(report['eval_seeds'])} seeds (never used for pairs) = {n['n_images']} images per model, at two "
             "sampling settings. Win rate of each model over the base per image (its image and the base's from the "
             "same noise; ties 0.5) and per prompt (seeds averaged); 95% intervals from a paired bootstrap that "
             "resamples prompts (with all their seeds); d_z, the effect size: the mean per-prompt score gain over its "
             "standard deviation.", ""]
    for setting, per_judge in report["win_rates_vs_base"].items():
        lines += [_setting_line(setting, report["sampling"][setting]) + ":", "",
                  "| judge | model | per image | 95% CI | per prompt | 95% CI | mean score (model / base) | d_z |",
                  "|---|---|---|---|---|---|---|---|"]
        for judge, per_model in per_judge.items():
            for model, r in per_model.items():
                lines.append(f"| {judge} | {LABELS[model]} | {r['image_win_rate']:.3f} | "
                             f"[{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}] | {r['win_rate']:.3f} | "
                             f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['mean_model']:.3f} / {r['mean_other']:.3f} | "
                             f"{'-' if r['effect_size'] is None else format(r['effect_size'], '.2f')} |")
        lines.append("")
    crowd = report["crowd_pairs"]
    lines += [f"Preference data: {crowd['pairs']} pairs from the base on {report['pair_prompts']} prompts. "
              f"The crowd called {crowd['ties']} ties; of its decided pairs, {crowd['crowd_prefers_higher_utility']:.1%} went to "
              f"the image of higher utility (temperature {crowd['temperature']:.3f} nats, calibrated so that two "
              f"independent crowd draws agree on {crowd['inter_rater_agreement']:.1%} of the pairs both decide, "
              "as two people do on Pick-a-Pic). The AI labels come from `relabel` with the AI reward."]
    lines += ["", "Head to head (per image):", "", "| setting | comparison | judge | win rate | 95% CI |",
              "|---|---|---|---|---|"]
    for setting, per_cmp in report["head_to_head"].items():
        for name, per_judge in per_cmp.items():
            a, b = name.split("_vs_")
            for judge, r in per_judge.items():
                lines.append(f"| {setting} | {NAMES[a]} vs {NAMES[b]} | {judge} | {r['image_win_rate']:.3f} | "
                             f"[{r['image_ci_low']:.3f}, {r['image_ci_high']:.3f}] |")
    lines += ["", f"Samples that fail to show the prompted digit (held-out judge: p(digit) < {FAIL_P}), and diversity "
              "(mean pairwise RMS pixel distance among a prompt's seeds):", "",
              "| setting | model | failing share | diversity | ratio to base |", "|---|---|---|---|---|"]
    for setting, div in report["diversity"].items():
        for name in LABELS:
            ratio = div["ratio_to_base"].get(name, 1.0)
            lines.append(f"| {setting} | {LABELS[name]} | {report['failure_share'][setting][name]:.3f} | "
                         f"{div[name]:.4f} | {ratio:.2f} |")
    lines += ["", "Targets:", "", "| target | value | met |", "|---|---|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Training (means over the last 10% of steps):", "",
              "| run | beta | steps | loss | implicit acc | reward margin | pairs/s |", "|---|---|---|---|---|---|---|"]
    settings = report["settings"]
    betas = {"dpo": f"{settings['beta']:g}", "dpo_ai": f"{settings['beta_ai']:g}",  # SFT has no beta
             "dpo_online": f"{settings.get('online_beta') or settings['beta_ai']:g}"}  # None: DPO-AI's
    for name, t in report["training"].items():
        lines.append(f"| {LABELS[name]} | {betas.get(name, '-')} | {t['steps']} | {t['final_loss']:.4f} | "
                     f"{t['final_implicit_acc']:.3f} | {t['final_reward_margin']:.3f} | {t['pairs_per_s']:.1f} |")
    lines += ["", "Wall time per stage (s):", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["wall_time_s"].items()]
    lines += ["", "Pictures: win_rates.png (per image, both settings), training_curves.png, score_distributions.png "
                  "and grid.png (base | DPO | DPO-AI | SFT, same prompts and seeds), at the demo's settings."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pictures (matplotlib, no display: evaluation/plots.py)

def plot_win_rates(path: Path, judged: dict, labels: dict[str, str] = LABELS) -> None:
    """Per-image win rate over the base with its 95% interval: one row per sampling setting, one column per judge;
    `labels` names the models' bars."""
    plt = pyplot()
    n_judges = len(next(iter(judged.values())))
    fig, axes = plt.subplots(len(judged), n_judges, figsize=(4 * n_judges, 3.0 * len(judged)), sharey=True,
                             squeeze=False)
    for row, (setting, per_judge) in zip(axes, judged.items()):
        for ax, (judge, per_model) in zip(row, per_judge.items()):
            names = list(per_model)
            rates = np.array([per_model[m]["image_win_rate"] for m in names])
            err = np.array([[r - per_model[m]["image_ci_low"], per_model[m]["image_ci_high"] - r]
                            for m, r in zip(names, rates)]).T
            ax.bar([labels[m] for m in names], rates, yerr=err, capsize=4,
                   color=[f"C{k}" for k in range(len(names))])
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
            ax.set_title(f"{judge}, {setting} sampling: per image vs base", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _plot_curves(path: Path, metrics: dict[str, list[dict]]) -> None:
    plt = pyplot()
    keys = ("loss", "implicit_acc", "reward_margin")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, key in zip(axes, keys):
        for name, rows in metrics.items():
            if name == "sft" and key != "loss":
                continue  # SFT has no reference, so no implicit accuracy or margin
            window = max(1, len(rows) // 20)
            y = _smooth([r[key] for r in rows], window)
            ax.plot(np.arange(len(y)) + window, y, label=LABELS[name])
        ax.set_title(key + " (moving average)")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_scores(path: Path, scores: dict[str, np.ndarray]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    everything = np.concatenate(list(scores.values()))
    bins = np.linspace(everything.min(), everything.max() + 1e-9, 30)
    for name, values in scores.items():
        ax.hist(values, bins=bins, histtype="step", lw=1.5, label=f"{LABELS[name]} (mean {np.mean(values):.2f})")
    ax.set_xlabel("held-out judge: log p(prompted digit)")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(gens: dict[str, Path]) -> Image.Image:
    """base | DPO | DPO-AI | SFT for one evaluation prompt per digit, at the first GRID_SEEDS seeds."""
    from diffusion_dpo.evaluation.compare import load_run, run_image
    from diffusion_dpo.evaluation.grids import compose_grid

    rows = {name: {(r["prompt_index"], r["seed"]): r for r in load_run(gens[name])} for name in LABELS}
    keys = sorted(rows["base"])
    seeds = sorted({s for _, s in keys})[:GRID_SEEDS]
    by_digit: dict[int, int] = {}
    for (i, _), row in sorted(rows["base"].items()):
        by_digit.setdefault(int(row.get("digit", i)), i)  # the first prompt of each digit
    prompts = list(by_digit.values())
    columns = {}
    for name in LABELS:
        columns[LABELS[name]] = [[run_image(gens[name], rows[name][(i, s)]["file"]) for s in seeds]
                                 for i in prompts]
    return compose_grid(columns, [rows["base"][(i, seeds[0])]["prompt"] for i in prompts], seeds)
