"""The report of an `iterate` run across rounds: report.json, report.md and report.png.

Per round: per-image win rate over the base and over the round before (95% intervals, prompts resampled), the
mean score gain over the base under the training reward and under the held-out reward(s) side by side, the
training reward of the round's own samples, and diversity as a ratio to the base's. The over-optimisation gap is

    gap_r = gain_r(training reward) / sd_base(training reward) - gain_r(held-out) / sd_base(held-out)

(each gain in units of the base's per-image spread, so two rewards of different scales compare): a gap that grows
round after round means the policy is learning the training reward's quirks rather than what the held-out reward
also sees. The stop rule (`iterate.stop_patience`) watches the held-out mean; report.json's "best" names the round
whose model scored the highest held-out mean (and its final/), which need not be the last.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from diffusion_dpo.evaluation.plots import pyplot


def base_summary(gens: dict[str, Path], specs: Sequence, scorer) -> dict:
    """The base's evaluation: mean and per-image sd of each reward, and its diversity."""
    from diffusion_dpo.evaluation.diversity import diversity

    scores = scorer(gens["base"])
    return {"means": {s.label: float(np.mean(scores[s.label])) for s in specs},
            "sds": {s.label: float(np.std(scores[s.label], ddof=1)) if len(scores[s.label]) > 1 else 0.0
                    for s in specs},
            "diversity": diversity(gens["base"])}


def heldout_means(base: dict, rounds: Sequence[dict], label: str) -> list[float]:
    """The held-out mean of the base (round 0) and of every round."""
    return [base["means"][label]] + [r["eval"]["means"][label] for r in rounds]


def stop_reason(base: dict, rounds: Sequence[dict], label: str, patience: int, min_delta: float) -> Optional[str]:
    """Why to stop after the last of `rounds`, or None: the held-out mean has not beaten its best by more than
    `min_delta` for `patience` rounds (patience 0: never stop early)."""
    if patience <= 0:
        return None
    means = heldout_means(base, rounds, label)
    best, best_at = means[0], 0
    for k, value in enumerate(means[1:], start=1):
        if value > best + min_delta:
            best, best_at = value, k
    if len(means) - 1 - best_at >= patience:
        return (f"the held-out {label} mean has not improved by more than {min_delta} for {patience} round(s) "
                f"(best {best:.4g} at round {best_at})")
    return None


def best_round(base: dict, rounds: Sequence[dict], label: str) -> Optional[dict]:
    """The round whose model scores the highest held-out mean (the earlier of equals), as
    {"round", "heldout_mean", "beats_base", "final"}; None before the first round. The stop rule keeps running
    rounds past it and `final` stays the last round's: this is where to take the model from instead."""
    if not rounds:
        return None
    means = heldout_means(base, rounds, label)
    k = max(range(1, len(means)), key=lambda i: (means[i], -i))
    return {"round": rounds[k - 1]["round"], "heldout_mean": means[k], "beats_base": means[k] > means[0],
            "final": rounds[k - 1]["final"]}


def _gap(base: dict, r: dict, train_label: str, heldout_label: str) -> Optional[float]:
    if train_label == heldout_label:
        return None
    sd_t, sd_h = base["sds"][train_label], base["sds"][heldout_label]
    if sd_t <= 0 or sd_h <= 0:
        return None
    vs = r["eval"]["vs_base"]
    return vs[train_label]["mean_diff"] / sd_t - vs[heldout_label]["mean_diff"] / sd_h


def write_report(out: Path, base: dict, rounds: Sequence[dict], train_label: str, heldout_label: str,
                 stopped: Optional[str]) -> dict:
    """Write report.json, report.md and report.png into `out`; return the report."""
    rows = []
    for r in rounds:
        ev = r["eval"]
        rows.append({"round": r["round"], "pairs": r["pairs"], "train_reward_of_samples": r["train_reward_mean"],
                     "vs_base": ev["vs_base"], "vs_previous": ev["vs_previous"], "means": ev["means"],
                     "diversity": ev["diversity"],
                     "diversity_ratio": ev["diversity"] / base["diversity"] if base["diversity"] else None,
                     "overoptimisation_gap": _gap(base, r, train_label, heldout_label),
                     "train": r["train"], "final": r["final"]})
    report = {"train_reward": train_label, "heldout_reward": heldout_label, "base": base, "rounds": rows,
              "stopped": stopped, "final": rows[-1]["final"] if rows else None,
              "best": best_round(base, rounds, heldout_label),
              "unit": "per-image win rates over (prompt, seed), the same initial noise for both models; 95% "
                      "intervals resample prompts (see evaluation/compare.py)"}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", _markdown(report))
    plot(report).save(out / "report.png")
    return report


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: the file is complete or absent (iterate's stage files too)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ci(r: dict, key: str = "image_win_rate", low: str = "image_ci_low", high: str = "image_ci_high") -> str:
    return f"{r[key]:.3f} [{r[low]:.3f}, {r[high]:.3f}]"


def _diff(r: dict) -> str:
    return f"{r['mean_diff']:+.4g} [{r['mean_diff_ci_low']:+.4g}, {r['mean_diff_ci_high']:+.4g}]"


def _num(x: Optional[float], fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def short_name(label: str) -> str:
    """A reward's name for a table header or a legend: an import path's function (`pkg.module:fn` -> `fn`)."""
    return label.rsplit(":", 1)[-1]


def _markdown(report: dict) -> str:
    t_full, h_full = report["train_reward"], report["heldout_reward"]
    t, h = short_name(t_full), short_name(h_full)
    lines = [f"# iterate: {len(report['rounds'])} round(s)", "",
             f"Training reward (labels the pairs): `{t_full}`; held-out reward (labels nothing): `{h_full}`. Per-image win rates "
             "over (prompt, seed) on the held-out prompts, from the same initial noise as the model compared with; "
             "95% intervals resample prompts. Gains are mean score differences over the base with their paired "
             "bootstrap intervals. Gap: the training reward's gain minus the held-out reward's, each in units of the "
             "base's per-image spread (growing = over-optimisation).", "",
             f"| round | pairs | {t} of its samples | win vs base ({h}) | win vs previous ({h}) | gain {t} | "
             f"gain {h} | gap | diversity / base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['pairs']} | {r['train_reward_of_samples']:.4g} | "
                     f"{_ci(r['vs_base'][h_full])} | {_ci(r['vs_previous'][h_full])} | {_diff(r['vs_base'][t_full])} | "
                     f"{_diff(r['vs_base'][h_full])} | {_num(r['overoptimisation_gap'], '+.3f')} | "
                     f"{_num(r['diversity_ratio'])} |")
    labels = list(report["rounds"][0]["vs_base"]) if report["rounds"] else []
    if set(labels) - {t_full, h_full}:  # more held-out rewards than the first: each one's numbers too
        lines += ["", "Every reward scored (the training reward and each held-out one), per round:", "",
                  "| round | reward | win vs base | win vs previous | gain over the base |", "|---|---|---|---|---|"]
        for r in report["rounds"]:
            lines += [f"| {r['round']} | {short_name(label)} | {_ci(r['vs_base'][label])} | "
                      f"{_ci(r['vs_previous'][label])} | {_diff(r['vs_base'][label])} |" for label in labels]
    base = report["base"]
    means = ", ".join(f"{short_name(label)} mean {m:.4g}" for label, m in base["means"].items())
    lines += ["", f"Base: {means}.", ""]
    if report["stopped"]:
        lines.append(f"Stopped early: {report['stopped']}.")
    if report["final"]:
        lines.append(f"Last round's model: `{report['final']}`.")
    best = report.get("best")
    if best and best["final"] != report["final"]:
        lines.append(f"Best round by the held-out {h} mean: round {best['round']} ({best['heldout_mean']:.4g}"
                     f"{'' if best['beats_base'] else ', no better than the base'}): `{best['final']}`.")
    elif best and not best["beats_base"]:
        lines.append(f"No round beat the base's held-out {h} mean.")
    lines += ["", "report.png: win rates, gains and diversity against the round."]
    return "\n".join(lines) + "\n"


def plot(report: dict):
    """Three panels against the round: win rates (vs base, vs previous) with intervals; gains of the training and
    held-out rewards in base-sd units; diversity relative to the base."""
    from diffusion_dpo.evaluation.plots import figure_image

    plt = pyplot()
    t, h = report["train_reward"], report["heldout_reward"]
    rounds = report["rounds"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.6))
    ax = axes[0]
    for key, name in (("vs_base", "vs base"), ("vs_previous", "vs previous round")):
        y = [r[key][h]["image_win_rate"] for r in rounds]
        err = [[v - r[key][h]["image_ci_low"] for v, r in zip(y, rounds)],
               [r[key][h]["image_ci_high"] - v for v, r in zip(y, rounds)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(title=f"per-image win rate ({short_name(h)})", xlabel="round", ylim=(0, 1))
    ax.legend(fontsize=8, frameon=False)
    ax = axes[1]
    for label, name in ((t, "training reward"), (h, "held-out reward")) if t != h else ((t, "training reward"),):
        sd = report["base"]["sds"][label] or 1.0
        y = [r["vs_base"][label]["mean_diff"] / sd for r in rounds]
        err = [[(r["vs_base"][label]["mean_diff"] - r["vs_base"][label]["mean_diff_ci_low"]) / sd for r in rounds],
               [(r["vs_base"][label]["mean_diff_ci_high"] - r["vs_base"][label]["mean_diff"]) / sd for r in rounds]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{name}: {short_name(label)}"[:48])
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set(title="gain over the base (base sd units)", xlabel="round")
    ax.legend(fontsize=8, frameon=False)
    ax = axes[2]
    ax.plot(x, [r["diversity_ratio"] if r["diversity_ratio"] is not None else np.nan for r in rounds], marker="o")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set(title="diversity / base's", xlabel="round", ylim=(0, 1.2))
    for ax in axes:
        ax.set_xticks(x)
    fig.tight_layout()
    return figure_image(fig)
