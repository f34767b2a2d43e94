"""Preference data for the demo: image pairs from the base model, labelled by a hidden crowd.

For each pair prompt, `generate` draws 2K images from the base model at seeds 0..2K-1 (pair k =
seeds 2k and 2k+1), and the crowd labels each pair by Bradley-Terry with ties (Rao and Kupper,
1967) on their utility u (scorers.crowd_utility):

    d  = (u_0 - u_1) / T
    P(image 0 preferred) = sigmoid(d - TIE)
    P(image 1 preferred) = sigmoid(-d - TIE)
    P(tie)               = 1 - the two above          (largest when the images are equally good)

one draw per pair from a seeded generator, as one person's click would be.

How consistent the crowd is, T, is set from Pick-a-Pic itself rather than picked: in its paper
(Kirstain et al. 2023) an independent human agrees with the user's choice on 68.0% of decided
pairs. T is solved so that two independent draws of our crowd, on the pairs at hand, agree on
`INTER_RATER_AGREEMENT` of the pairs both decide (`calibrate_temperature`); on the demo's base
that is T ~ 0.35 nats, and each label then follows the higher utility ~74% of the time. The result is written
in the Pick-a-Pic v2 schema (data.schema.SCHEMA: every column, PNG bytes), so training, `relabel`
and the data checks read it exactly as they read Pick-a-Pic.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffusion_dpo.demo import scorers
from diffusion_dpo.data.images import load_rgb
from diffusion_dpo.data.schema import SCHEMA, pickapic_row

INTER_RATER_AGREEMENT = 0.680  # Pick-a-Pic's human-human agreement on decided pairs (Kirstain et al. 2023, 68.0%)
TIE = 0.3  # Rao-Kupper threshold: equal images are called a tie 15% of the time
FILE = "train-00000-of-00001.parquet"


def crowd_probabilities(u0: np.ndarray, u1: np.ndarray,
                        temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(image 0 preferred), P(image 1 preferred), P(tie)) for utilities u0, u1 (each (N,))."""
    from scipy.special import expit  # the logistic function without overflow at large |d|

    d = (np.asarray(u0, np.float64) - np.asarray(u1, np.float64)) / temperature
    p0, p1 = expit(d - TIE), expit(-d - TIE)
    return p0, p1, 1.0 - p0 - p1


def inter_rater_agreement(u0: np.ndarray, u1: np.ndarray, temperature: float) -> float:
    """P(two independent crowd draws agree | both decide the pair), over the pairs given."""
    p0, p1, _ = crowd_probabilities(u0, u1, temperature)
    return float((p0 ** 2 + p1 ** 2).sum() / ((p0 + p1) ** 2).sum())


def calibrate_temperature(u0: np.ndarray, u1: np.ndarray, agreement: float = INTER_RATER_AGREEMENT) -> float:
    """The T at which `inter_rater_agreement` is `agreement` on these pairs (it falls as T grows)."""
    lo, hi = 1e-3, 1e3  # log-space bisection; 60 halvings leave T exact to float precision
    if inter_rater_agreement(u0, u1, lo) < agreement:
        return lo  # the pairs are too alike for so consistent a crowd: the most consistent one we allow
    for _ in range(60):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if inter_rater_agreement(u0, u1, mid) > agreement else (lo, mid)
    return float(np.sqrt(lo * hi))


def crowd_labels(u0: np.ndarray, u1: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """label_0 per pair: 1.0 (image 0 preferred), 0.0 (image 1) or 0.5 (tie), one draw each."""
    p0, p1, _ = crowd_probabilities(u0, u1, temperature)
    draw = rng.random(len(p0))
    return np.where(draw < p0, 1.0, np.where(draw < p0 + p1, 0.0, 0.5))


@dataclass
class PairSet:
    """Where the pairs went and how the crowd labelled them."""

    path: Path
    pairs: int
    ties: int
    crowd_prefers_higher_utility: float  # of decided pairs: how often the chosen image has the higher u
    temperature: float  # the crowd's T, calibrated on these pairs
    inter_rater_agreement: float  # two independent draws agree on this share of the pairs both decide


def pair_seeds(pairs_per_prompt: int) -> list[int]:
    """Seeds for one prompt's images; pair k is (seeds[2k], seeds[2k+1])."""
    return list(range(2 * pairs_per_prompt))


def label_pairs(run_dir: Path, rows: Sequence[dict], out_dir: Path, seed: int) -> PairSet:
    """Pair up a `generate` run's images (rows from compare.load_run), label them, write one parquet file."""
    by_key = {(r["prompt_index"], r["seed"]): r for r in rows}
    firsts = sorted(k for k in by_key if k[1] % 2 == 0 and (k[0], k[1] + 1) in by_key)
    img0 = [_load(run_dir / by_key[k]["file"]) for k in firsts]
    img1 = [_load(run_dir / by_key[(k[0], k[1] + 1)]["file"]) for k in firsts]
    digits = [int(by_key[k]["digit"]) for k in firsts]
    u0, u1 = scorers.crowd_utility(img0, digits), scorers.crowd_utility(img1, digits)
    temperature = calibrate_temperature(u0, u1)
    labels = crowd_labels(u0, u1, temperature, np.random.default_rng(seed))
    t0 = dt.datetime(2024, 1, 1)
    table = []
    for n, (k, label) in enumerate(zip(firsts, labels)):
        row0, row1 = by_key[k], by_key[(k[0], k[1] + 1)]
        table.append(pickapic_row(row0["prompt"], (run_dir / row0["file"]).read_bytes(),
                                  (run_dir / row1["file"]).read_bytes(), float(label), f"p{k[0]:04d}-s{k[1]}",
                                  f"p{k[0]:04d}-s{k[1] + 1}", t0 + dt.timedelta(seconds=n), n, int(k[0]),
                                  "demo-base", "demo-base"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (FILE + ".tmp")
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), tmp)
    tmp.rename(out_dir / FILE)  # complete or absent
    decided = labels != 0.5
    higher = np.where(labels == 1.0, u0 > u1, u1 > u0)[decided]
    return PairSet(path=out_dir, pairs=len(labels), ties=int((~decided).sum()),
                   crowd_prefers_higher_utility=float(higher.mean()) if higher.size else float("nan"),
                   temperature=temperature, inter_rater_agreement=inter_rater_agreement(u0, u1, temperature))


def _load(path: Path) -> Image.Image:
    """A run's image (a row of compare.load_run, so inside the run's images/) by the project's safe decoder."""
    return load_rgb(path)
