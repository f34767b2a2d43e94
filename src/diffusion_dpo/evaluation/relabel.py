"""AI-feedback relabelling: replace human preference labels by a reward model's (the paper's AI-feedback variant).

For each pair, both images are scored with one reward or a weighted sum of several
(score = sum_k w_k * r_k(image, caption)), and the pair is relabelled

    d = score(jpg_0) - score(jpg_1);   |d| <= margin -> tie (0.5/0.5);   d > 0 -> label_0 = 1;   d < 0 -> label_0 = 0

Ties are kept as 0.5/0.5 (training drops them by default, as for human ties) or dropped with `drop_ties`.
The output has the input's schema, labels (and `best_image_uid`) replaced, plus `ai_score_0`/`ai_score_1`.
Agreement with the original labels is measured on pairs that both the people and the reward decided.

Pick-a-Pic parquet is processed shard by shard; each output shard is written atomically with its
statistics beside it, so an interrupted run resumes at the first unfinished shard. Local JSONL/CSV data
is written as JSONL (chosen = the reward's winner, with both scores; ties dropped, as that format has no
tie label). Images are read under the data rules (`data/pairs.py`): table cells must carry image bytes, local paths
must lie in the data file's folder or `image_root`. The output JSONL is self-contained: its images are hard links
(copies across filesystems) under the output's `images/`, named relative to it, so it trains as it is.

    diffusion-dpo relabel --data.path pickapic/ --reward pickscore=1,aesthetic=0.5 --output-dir pickapic_ai/
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_dpo.errors import UserError, is_local_path
from diffusion_dpo.processes import Share
from diffusion_dpo.data.images import cell_problem, image_source, load_rgb, short_reason

SETTINGS_FILE = "relabel.json"
REPORT_FILE = "relabel_report.json"


@dataclass
class RelabelStats:
    """Counts for a shard or a whole run."""

    rows: int = 0
    decided: int = 0  # the reward preferred one image by more than the margin
    ties: int = 0  # |d| <= margin
    dropped: int = 0  # ties removed with drop_ties
    compared: int = 0  # pairs decided both by people and by the reward
    agree: int = 0  # ... on which they chose the same image

    def add(self, other: "RelabelStats") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    @property
    def agreement(self) -> Optional[float]:
        return self.agree / self.compared if self.compared else None


def new_labels(score_0: np.ndarray, score_1: np.ndarray, margin: float) -> np.ndarray:
    """label_0 from the two scores: 1 (jpg_0 better by more than margin), 0 (jpg_1 better), 0.5 (tie)."""
    d = score_0 - score_1
    return np.where(np.abs(d) <= margin, 0.5, np.where(d > 0, 1.0, 0.0))


def _agreement(old: np.ndarray, new: np.ndarray) -> tuple[int, int]:
    """(pairs decided by both, pairs where both chose the same image)."""
    both = (np.abs(old - 0.5) > 0.25) & (new != 0.5)
    return int(both.sum()), int((both & (np.round(old) == new)).sum())


class PairScorer:
    """Scores (image, caption) lists with a weighted sum of rewards, each model loaded once."""

    def __init__(self, spec: str, paths: Optional[dict[str, str]], device: str, batch_size: int):
        from diffusion_dpo.evaluation.compare import parse_rewards
        from diffusion_dpo.evaluation.rewards import load_reward

        (self.spec,) = parse_rewards([spec], paths)
        self.models = {n: load_reward(n, (paths or {}).get(n), device=device, batch_size=batch_size)
                       for n, _ in self.spec.terms}
        self.commits = {k: v for m in self.models.values() for k, v in sorted(m.commits.items())}

    def __call__(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        from diffusion_dpo.evaluation.rewards import weighted_score

        names, weights = zip(*self.spec.terms)
        total = weighted_score([self.models[n] for n in names], weights, images, captions).double().numpy()  # (N,)
        if not np.all(np.isfinite(total)):
            raise UserError(f"reward '{self.spec.label}' returned a non-finite score")
        return total


def _decode(cells: Sequence, where: str, column: str, first_row: int) -> list:
    out = []
    for k, cell in enumerate(cells):
        problem = cell_problem(cell)  # bytes only: a path in the data is never opened (DESIGN.md §7)
        if problem is not None:
            raise UserError(f"{where} row {first_row + k}: {column} {problem}")
        try:
            out.append(load_rgb(image_source(cell)))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image in the data
            raise UserError(f"{where} row {first_row + k}: {column} cannot be decoded as an image "
                            f"({short_reason(exc)})") from None
    return out


def _relabel_table(table: pa.Table, where: str, scorer: PairScorer, margin: float, drop_ties: bool,
                   batch_size: int) -> tuple[pa.Table, RelabelStats]:
    """Score both images of every row of one shard; return the relabelled table and its counts."""
    for column in ("caption", "jpg_0", "jpg_1", "label_0"):
        if column not in table.column_names:
            raise UserError(f"{where}: missing column {column}; columns present: {', '.join(table.column_names)}")
    captions = [c or "" for c in table.column("caption").to_pylist()]
    s0, s1 = np.zeros(table.num_rows), np.zeros(table.num_rows)
    for start in range(0, table.num_rows, batch_size):
        stop = min(start + batch_size, table.num_rows)
        img0 = _decode(table.column("jpg_0").slice(start, stop - start).to_pylist(), where, "jpg_0", start)
        img1 = _decode(table.column("jpg_1").slice(start, stop - start).to_pylist(), where, "jpg_1", start)
        scores = scorer(img0 + img1, captions[start:stop] * 2)  # both images of a pair in one batch
        s0[start:stop], s1[start:stop] = scores[: stop - start], scores[stop - start:]
    old = table.column("label_0").cast(pa.float64()).to_numpy(zero_copy_only=False)
    labels = new_labels(s0, s1, margin)
    compared, agree = _agreement(old, labels)
    stats = RelabelStats(rows=table.num_rows, decided=int((labels != 0.5).sum()), ties=int((labels == 0.5).sum()),
                         compared=compared, agree=agree)
    out = _set(table, "label_0", pa.array(labels, pa.float64()))
    if "label_1" in out.column_names:
        out = _set(out, "label_1", pa.array(1.0 - labels, pa.float64()))
    if {"best_image_uid", "image_0_uid", "image_1_uid"} <= set(out.column_names):
        uid0, uid1 = out.column("image_0_uid").to_pylist(), out.column("image_1_uid").to_pylist()
        best = out.column("best_image_uid").to_pylist()
        best = [a if lab == 1.0 else b if lab == 0.0 else keep for a, b, keep, lab in zip(uid0, uid1, best, labels)]
        out = _set(out, "best_image_uid", pa.array(best, out.schema.field("best_image_uid").type))
    out = _set(out, "ai_score_0", pa.array(s0, pa.float64()))
    out = _set(out, "ai_score_1", pa.array(s1, pa.float64()))
    if drop_ties:
        keep = labels != 0.5
        stats.dropped = int((~keep).sum())
        out = out.filter(pa.array(keep))
    return out, stats


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _previous_settings(out_dir: Path, settings: dict) -> dict:
    """The settings of the relabelling `out_dir` holds ({} if none), with its pins applied to this one: the reward
    weights' hub commits preset (a resume reads the same weights), a hub data set's commit reused, else pinned."""
    from diffusion_dpo.pinning import is_hub_id, resolve_commit
    from diffusion_dpo.evaluation.rewards.common import preset_pins

    file = out_dir / SETTINGS_FILE
    previous = json.loads(file.read_text()) if file.exists() else {}
    preset_pins(previous.get("reward_commits", {}))
    if is_hub_id(settings["data"]):
        settings["data_commit"] = previous.get("data_commit") if previous.get("data") == settings["data"] else \
            resolve_commit(settings["data"], None, "dataset")
    return previous


def _check_settings(out_dir: Path, settings: dict) -> None:
    """A resumed run must use the same data, rewards and thresholds as the one it continues (checks only:
    nothing is written before the rewards have loaded; their commits, known once loaded, were preset)."""
    file = out_dir / SETTINGS_FILE
    if file.exists():
        previous = {k: v for k, v in json.loads(file.read_text()).items() if k != "reward_commits"}
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise UserError(f"{out_dir} holds a relabelling with other settings ({', '.join(changed)}); "
                            "use another --output-dir")


def _write_settings(out_dir: Path, settings: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))


def relabel(data: str | Path, reward: str, out_dir: str | Path, paths: Optional[dict[str, str]] = None,
            device: str = "cpu", batch_size: int = 16, margin: float = 0.0, drop_ties: bool = False,
            split: str = "train", image_root: Optional[str] = None, state: Any = None) -> dict:
    """Relabel a Pick-a-Pic-schema data set (parquet file or directory, save_to_disk directory, hub id) or a
    local JSONL/CSV set; return the report. `image_root`: as data.image_root, for a local set's image paths.
    `state`: accelerate's process state under `accelerate launch`: every process scores its share of the shards
    (each on its own `device`), and every process must call it; a local JSONL/CSV set is scored by the main one."""
    from tqdm.auto import tqdm

    procs = Share(state)
    data, out_dir = Path(data), Path(out_dir)
    if margin < 0:
        raise UserError(f"--margin must be >= 0 (got {margin})")
    if not data.exists() and (is_local_path(str(data)) or data.suffix):
        raise UserError(f"data '{data}' not found")
    if data.suffix.lower() in (".jsonl", ".json", ".csv"):
        return procs.main_does(lambda: _relabel_local(data, reward, out_dir, paths, device, batch_size, margin,
                                                      drop_ties, image_root))
    settings = {"data": str(data.resolve()) if data.exists() else str(data), "reward": reward,
                "paths": paths or {}, "margin": margin, "drop_ties": drop_ties}

    def settle() -> tuple[dict, dict]:  # the main process reads what out_dir holds and pins the hub data set
        previous = _previous_settings(out_dir, settings)
        _check_settings(out_dir, settings)
        return settings, previous.get("reward_commits", {})

    settings, pins = procs.main_does(settle)
    if not procs.is_main:
        from diffusion_dpo.evaluation.rewards.common import preset_pins

        preset_pins(pins)  # the weights the main process's earlier run read
    shards = procs.all_do(lambda: _shards(data, split, settings.get("data_commit")))
    scorer = procs.all_do(lambda: PairScorer(reward, paths, device, batch_size))
    procs.main_does(lambda: _write_settings(out_dir, {**settings, "reward_commits": scorer.commits}))
    stats_file = [(out_dir / target).with_suffix(".stats.json") for _, target, _ in shards]
    # a shard with its stats file was finished in an earlier (interrupted) run
    mine = procs.of_missing(list(range(len(shards))), lambda k: stats_file[k].exists())

    def score() -> None:
        with tqdm(total=len(mine), desc="relabel", unit="shard", disable=not mine or not procs.is_main) as progress:
            for k in mine:
                name, target, read = shards[k]
                out, stats = _relabel_table(read(), name, scorer, margin, drop_ties, batch_size)
                path = out_dir / target
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".parquet.tmp")
                pq.write_table(out, tmp)
                tmp.rename(path)  # a shard is either complete or absent
                stats_file[k].write_text(json.dumps(asdict(stats)))  # marks the shard done
                progress.update(1)

    procs.all_do(score)

    def report() -> dict:
        total = RelabelStats()
        for f in stats_file:
            total.add(RelabelStats(**json.loads(f.read_text())))
        return _report(out_dir, total, settings)

    return procs.main_does(report)


ROWS_PER_SHARD = 10_000  # output shard size for save_to_disk / hub inputs


def _shards(data: Path, split: str, revision: Optional[str] = None) -> list[tuple[str, str, Callable[[], pa.Table]]]:
    """(name for messages, output file relative to out_dir, reader) for each unit of work; `revision`: a hub data
    set's pinned commit."""
    if data.is_file() and data.suffix.lower() == ".parquet":
        return [(str(data), data.name, _parquet_reader(data))]
    if data.is_dir() and not ((data / "state.json").exists() or (data / "dataset_dict.json").exists()):
        files = sorted(p for p in data.rglob("*.parquet") if p.is_file())
        if not files:
            raise UserError(f"data '{data}' holds no .parquet files and is not a datasets.save_to_disk directory")
        return [(str(f), str(f.relative_to(data)), _parquet_reader(f)) for f in files]
    import datasets

    try:
        if data.is_dir():
            ds = datasets.load_from_disk(str(data))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{data}: split '{split}' not found; available: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(data), split=split, revision=revision)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, unreadable directory
        raise UserError(f"data '{data}' could not be loaded ({short_reason(exc)})") from None
    for column in ("jpg_0", "jpg_1"):  # keep the encoded bytes
        if isinstance(ds.features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    table = ds.flatten_indices().data.table if getattr(ds, "_indices", None) is not None else ds.data.table
    n = table.num_rows
    return [(f"{data} rows {start}..{min(start + ROWS_PER_SHARD, n) - 1}", f"train-{k:05d}.parquet",
             lambda start=start: table.slice(start, ROWS_PER_SHARD))
            for k, start in enumerate(range(0, n, ROWS_PER_SHARD))]


def _parquet_reader(path: Path) -> Callable[[], pa.Table]:
    def read() -> pa.Table:
        try:
            return pq.read_table(path)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: not a readable parquet file ({short_reason(exc)})") from None
    return read


def _relabel_local(data: Path, reward: str, out_dir: Path, paths, device, batch_size, margin, drop_ties,
                   image_root: Optional[str] = None) -> dict:
    """JSONL/CSV (prompt, chosen, rejected) -> out_dir/pairs.jsonl with the reward's choice first and scores."""
    from diffusion_dpo.config import DataConfig
    from diffusion_dpo.data.pairs import load_preference_pairs

    pairs = load_preference_pairs(DataConfig(path=str(data), image_root=image_root, num_workers=0))
    settings = {"data": str(data.resolve()), "reward": reward, "paths": paths or {}, "margin": margin,
                "drop_ties": drop_ties}
    _previous_settings(out_dir, settings)
    _check_settings(out_dir, settings)
    scorer = PairScorer(reward, paths, device, batch_size)
    _write_settings(out_dir, {**settings, "reward_commits": scorer.commits})
    stats, lines = RelabelStats(rows=len(pairs)), []
    for start in range(0, len(pairs), batch_size):
        items = [pairs.get(i) for i in range(start, min(start + batch_size, len(pairs)))]
        images = [load_rgb(w) for _, w, _, _ in items] + [load_rgb(l) for _, _, l, _ in items]
        scores = scorer(images, [c for c, *_ in items] * 2)
        chosen_scores, rejected_scores = scores[: len(items)], scores[len(items):]
        labels = new_labels(chosen_scores, rejected_scores, margin)  # 1: the people's choice stays first
        for (caption, win, lose, _), sc, sr, lab in zip(items, chosen_scores, rejected_scores, labels):
            if lab == 0.5:  # the local format has no tie label: a tie is dropped (and counted)
                stats.dropped += 1
                continue
            first, second, fs, ss = (win, lose, sc, sr) if lab != 0.0 else (lose, win, sr, sc)
            lines.append({"prompt": caption, "chosen": _local_copy(first, out_dir),
                          "rejected": _local_copy(second, out_dir), "chosen_score": float(fs),
                          "rejected_score": float(ss)})
        stats.decided += int((labels != 0.5).sum())
        stats.ties += int((labels == 0.5).sum())
        stats.compared += int((labels != 0.5).sum())
        stats.agree += int((labels == 1.0).sum())
    tmp = out_dir / "pairs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.rename(out_dir / "pairs.jsonl")
    return _report(out_dir, stats, settings)


def _local_copy(image: str, out_dir: Path) -> str:
    """`image` placed under out_dir/images/ (a hard link: no second copy of the bytes; a copy where the two lie on
    different filesystems), named by a hash of its resolved path; returns the name relative to out_dir."""
    import hashlib
    import os
    import shutil

    source = Path(image).resolve()
    name = f"images/{hashlib.sha256(str(source).encode()).hexdigest()[:20]}{source.suffix.lower()}"
    target = out_dir / name
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return name


def _report(out_dir: Path, total: RelabelStats, settings: dict) -> dict:
    report = {**asdict(total), "agreement": total.agreement, "settings": settings}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report
