"""On-policy pairs: a prompt's K scored samples -> preference pairs in the Pick-a-Pic v2 schema.

Rules (`iterate.pairing`), for the K samples (seed s, score r_s) of one prompt:

    best_worst   one pair: argmax_s r_s (winner) against argmin_s r_s (loser), kept when r_max - r_min > margin
                 (flow_grpo's OnlineDPO: the best and the worst of a group); ties in score go to the lower seed
    all          every two samples (s, s') with |r_s - r_s'| > margin, the higher score first: K(K-1)/2 pairs at
                 most, more signal per sample but correlated pairs (each sample is in up to K-1 of them)

Every pair is written as a decided Pick-a-Pic row (label_0 = 1: the winner is jpg_0) with both scores in
ai_score_0/ai_score_1, as `relabel` writes them, so `train` and the data checks read it like any Pick-a-Pic shard.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_dpo.errors import UserError
from diffusion_dpo.data.schema import SCHEMA, pickapic_row

PAIRS_FILE = "train-00000-of-00001.parquet"


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    winner: int  # index into the prompt's samples (the rows given)
    loser: int
    margin: float  # score(winner) - score(loser) > 0


def pairs_of_prompt(scores: Sequence[float], rule: str, margin: float) -> list[Pair]:
    """The pairs of one prompt's samples by `rule` (module docstring); `prompt_index` is filled by the caller."""
    if rule == "best_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of equal maxima
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        gap = scores[best] - scores[worst]
        return [Pair(-1, best, worst, gap)] if gap > margin else []
    if rule == "all":
        out = []
        for i, j in combinations(range(len(scores)), 2):
            gap = scores[i] - scores[j]
            if abs(gap) > margin:
                out.append(Pair(-1, i, j, gap) if gap > 0 else Pair(-1, j, i, -gap))
        return out
    raise UserError(f"unknown pairing rule '{rule}' (best_worst or all)")


def make_pairs(rows: Sequence[dict], scores: Sequence[float], rule: str, margin: float) -> list[tuple[Pair, dict, dict]]:
    """(pair, winner row, loser row) for every prompt of a `generate` run (rows from compare.load_run, scores
    aligned with them), prompts in order."""
    by_prompt: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        by_prompt.setdefault(int(row["prompt_index"]), []).append(k)
    out = []
    for prompt_index in sorted(by_prompt):
        members = by_prompt[prompt_index]
        for pair in pairs_of_prompt([float(scores[k]) for k in members], rule, margin):
            out.append((Pair(prompt_index, pair.winner, pair.loser, pair.margin), rows[members[pair.winner]],
                        rows[members[pair.loser]]))
    return out


def write_pairs(run_dir: Path, pairs: Sequence[tuple[Pair, dict, dict]], scores: dict[str, float], out_dir: Path,
                model_name: str, round_index: int) -> Path:
    """Write the pairs as one Pick-a-Pic parquet shard (temporary name, then renamed: complete or absent).
    `scores` maps a sample's file to its score."""
    t0 = dt.datetime(2024, 1, 1)
    table = []
    for n, (pair, win, lose) in enumerate(pairs):
        uid = [f"r{round_index}-p{row['prompt_index']:05d}-s{row['seed']}" for row in (win, lose)]
        table.append(pickapic_row(win["prompt"], (run_dir / win["file"]).read_bytes(),
                                  (run_dir / lose["file"]).read_bytes(), 1.0, uid[0], uid[1],
                                  t0 + dt.timedelta(seconds=n), n, round_index, model_name, model_name))
    data = pa.Table.from_pylist(table, schema=SCHEMA)
    data = data.append_column("ai_score_0", pa.array([scores[w["file"]] for _, w, _ in pairs], pa.float64()))
    data = data.append_column("ai_score_1", pa.array([scores[lo["file"]] for _, _, lo in pairs], pa.float64()))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (PAIRS_FILE + ".tmp")
    pq.write_table(data, tmp)
    tmp.rename(out_dir / PAIRS_FILE)
    return out_dir / PAIRS_FILE
