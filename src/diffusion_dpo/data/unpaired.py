"""Unpaired feedback (thumbs up / thumbs down): single images with a binary label, for losses such as KTO.

Sources (`data.path`), told from pairs by their columns:
  * JSONL/JSON/CSV with `prompt`, `image` (a path relative to the data file, inside its folder or
    `data.image_root`, as for pairs) and `label` (1/0, true/false; in CSV also "1"/"0"/"true"/"false"): 1 is
    desirable, 0 undesirable;
  * a .parquet file or a directory of shards with `prompt` (strings), `image` (bytes, or {bytes, path} structs as
    `datasets` writes them, with the bytes: a path alone is never opened) and `label` (numbers 0/1 or booleans);
  * any pair source with `data.unpaired true`: each decided pair gives two items, its winner (label 1) and its
    loser (label 0); ties carry no thumbs and are dropped (counted).

Validated like pairs, before any model loads (the same row checks, image decoding in a process pool and
one-line errors naming the file and row). Items stay as (row, which image, label) over the same Arrow memory map
or list of records, so splitting 851K Pick-a-Pic pairs costs a few MB. `load_feedback` is the entry point for
training and the cache: pairs or items, whichever the data and `data.unpaired` say.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.pairs import (LOCAL_SUFFIXES, PreferencePairs, image_cell_checks, load_preference_pairs,
                                      parquet_files, row_captions)
from diffusion_dpo.data.records import RowNamer, image_root, is_binary, local_image, read_local_records, select_rows
from diffusion_dpo.errors import UserError
from diffusion_dpo.data.images import FileImages, ImageSource, TableImages, image_source, short_reason

UNPAIRED_KEYS = ("prompt", "image", "label")
_TRUE, _FALSE = ("1", "1.0", "true", "True"), ("0", "0.0", "false", "False")


@dataclass(eq=False)
class UnpairedItems:
    """Validated single images with a binary label; the rows stay lazily in `rows` (see the module docstring).

    `rows` is a datasets.Dataset (a `caption` column and the undecoded image columns `image_columns`) or a list of
    records (prompt, image path, ...) with None for bad lines; item i is image `column[i]` of row `row_index[i]`."""

    source: str
    rows: Any
    row_index: np.ndarray  # (N,) int64
    column: np.ndarray  # (N,) int8: the position of the item's image among the row's images
    labels: np.ndarray  # (N,) float32: 1 desirable, 0 undesirable
    where_row: RowNamer
    image_columns: tuple[str, ...] = ("image",)
    num_rows: int = 0
    num_ties_dropped: int = 0
    num_bad_skipped: int = 0
    first_bad: Optional[str] = None
    stopped_at_row: Optional[int] = None
    images_per_item = 1  # one image per training item (pairs have 2)

    def __len__(self) -> int:
        return len(self.row_index)

    def images(self, i: int) -> tuple[str, tuple[ImageSource], float]:
        """(caption, (image source,), label) of item `i`."""
        row, k = int(self.row_index[i]), int(self.column[i])
        if isinstance(self.rows, list):
            record = self.rows[row]
            return record[0], (record[1 + k],), float(self.labels[i])
        rec = self.rows[row]
        return rec["caption"], (image_source(rec[self.image_columns[k]]),), float(self.labels[i])

    def captions(self) -> list[str]:
        """Every item's caption, in item order, without touching the images."""
        return row_captions(self.rows, self.row_index)

    def where(self, i: int) -> str:
        return self.where_row(int(self.row_index[i]))

    def summary(self) -> str:
        """One line: rows, items used (desirable / undesirable), ties dropped, bad rows skipped."""
        up = int((self.labels == 1).sum())
        text = (f"{self.source}: {self.num_rows} rows, {len(self)} unpaired items used ({up} desirable, "
                f"{len(self) - up} undesirable), {self.num_ties_dropped} ties dropped, {self.num_bad_skipped} bad "
                f"rows skipped" + (f" (first: {self.first_bad})" if self.first_bad else ""))
        if self.stopped_at_row is not None:
            text += f" (data.max_pairs reached at {self.where_row(self.stopped_at_row - 1)})"
        return text


Feedback = Union[PreferencePairs, UnpairedItems]


def load_feedback(cfg: DataConfig) -> Feedback:
    """The training data of `cfg`: unpaired items (an unpaired source, or pairs split by `data.unpaired`) or pairs."""
    path = Path(cfg.path).expanduser()
    if _is_unpaired_source(path):
        if cfg.unpaired:
            raise UserError(f"data.path '{cfg.path}' already holds unpaired items (prompt, image, label); "
                            "data.unpaired splits pairs: leave it false")
        return _load_unpaired_local(path, cfg.path, cfg) if path.suffix.lower() in LOCAL_SUFFIXES else \
            _load_unpaired_parquet(path, cfg)
    pairs = load_preference_pairs(cfg)
    return split_pairs(pairs) if cfg.unpaired else pairs


def split_pairs(pairs: PreferencePairs) -> UnpairedItems:
    """Each decided pair -> its winner (label 1) and its loser (label 0), side by side; ties are dropped."""
    decided = np.flatnonzero(pairs.labels == 1.0)
    if len(decided) == 0:
        raise UserError(f"{pairs.source}: no decided pairs to split into unpaired items (data.unpaired)")
    rows = np.repeat(pairs.row_index[decided], 2)
    if isinstance(pairs.rows, list):  # (prompt, chosen, rejected): the winner is always column 0
        winner = np.zeros(len(decided), np.int8)
        columns: tuple[str, ...] = ("chosen", "rejected")
    else:
        winner = pairs.winner_is_1[decided].astype(np.int8)
        columns = ("jpg_0", "jpg_1")
    column = np.stack([winner, 1 - winner], axis=1).reshape(-1)
    labels = np.tile(np.array([1.0, 0.0], np.float32), len(decided))
    return UnpairedItems(source=pairs.source, rows=pairs.rows, row_index=rows, column=column, labels=labels,
                         where_row=pairs.where_row, image_columns=columns, num_rows=pairs.num_rows,
                         num_ties_dropped=pairs.num_ties_dropped + int(len(pairs) - len(decided)),
                         num_bad_skipped=pairs.num_bad_skipped, first_bad=pairs.first_bad,
                         stopped_at_row=pairs.stopped_at_row)


# ---------------------------------------------------------------- detection


def _is_unpaired_source(path: Path) -> bool:
    """True when a local file or parquet directory has `image` (and not the pair columns)."""
    if path.is_dir():
        files = parquet_files(path, "train") if not (path / "dataset_dict.json").is_file() and \
            not (path / "state.json").is_file() else []
        return bool(files) and _unpaired_schema(files[0])
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _unpaired_schema(path)
    if suffix not in LOCAL_SUFFIXES:
        return False
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return False  # the pair loader reports it
    if suffix == ".csv":
        return _unpaired_keys(next(csv.reader(io.StringIO(text, newline="")), []))
    first: Any = None
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
            first = items[0] if items else None
        else:
            line = next((ln for ln in text.split("\n") if ln.strip()), "")
            first = json.loads(line) if line else None
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and _unpaired_keys(first)


def _unpaired_keys(keys: Any) -> bool:
    """A record or header of unpaired items: `image` or `label`, and neither `chosen` nor `rejected`."""
    return ("image" in keys or "label" in keys) and "chosen" not in keys and "rejected" not in keys


def _unpaired_schema(path: Path) -> bool:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception:  # noqa: BLE001 - the pair loader reports an unreadable file
        return False
    return "image" in names and "jpg_0" not in names


# ---------------------------------------------------------------- parquet


def _check_unpaired_schema(schema: pa.Schema, where: str) -> None:
    names = schema.names
    missing = [c for c in UNPAIRED_KEYS if c not in names]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)} (unpaired items need prompt, image, "
                        f"label); columns present: {', '.join(names) or '(none)'}")
    t = schema.field("prompt").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise UserError(f"{where}: column prompt has type {t}, expected strings")
    t = schema.field("label").type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)):
        raise UserError(f"{where}: column label has type {t}, expected 1/0 or true/false")
    t = schema.field("image").type
    if not (is_binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
        raise UserError(f"{where}: column image has type {t}, expected image bytes")


def _load_unpaired_parquet(path: Path, cfg: DataConfig) -> UnpairedItems:
    import datasets

    spec = cfg.path
    files = [path] if path.is_file() else parquet_files(path, cfg.split)
    names = [spec] if path.is_file() else [str(Path(spec) / f.relative_to(path)) for f in files]
    starts, total = [], 0
    for f, name in zip(files, names):
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{name}: not a readable parquet file ({short_reason(exc)})") from None
        _check_unpaired_schema(meta.schema.to_arrow_schema(), name)
        starts.append(total)
        total += meta.num_rows
    if total == 0:
        raise UserError(f"{spec} has no usable items: 0 rows")
    try:
        ds = datasets.Dataset.from_parquet([str(f) for f in files], columns=list(UNPAIRED_KEYS))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{spec}: could not read the parquet files ({short_reason(exc)})") from None
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.rename_column("prompt", "caption")
    table, n = ds.data, ds.num_rows
    where = RowNamer(names, starts)
    label = table.column("label").cast(pa.float64()).to_numpy(zero_copy_only=False)
    checks = [
        (table.column("caption").is_null().to_numpy(zero_copy_only=False), lambda r: "prompt is null"),
        (np.isnan(label), lambda r: "label is null or NaN"),
        (~np.isnan(label) & ~np.isin(label, (0.0, 1.0)), lambda r: f"label is {label[r]:g}, expected 1 or 0"),
        *image_cell_checks(table.column("image"), "image"),  # bytes only: a path-only cell is a bad row
    ]
    bad = np.logical_or.reduce([mask for mask, _ in checks])
    kept, info = select_rows(n, bad, np.zeros(n, bool), lambda r: next(m(r) for mask, m in checks if mask[r]),
                         TableImages(ds, columns=("image",)), where, spec, cfg)
    return UnpairedItems(source=spec, rows=ds, row_index=kept, column=np.zeros(len(kept), np.int8),
                         labels=label[kept].astype(np.float32), where_row=where, num_rows=n, **info)


# ---------------------------------------------------------------- local JSONL / CSV


def _label_value(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip() in _TRUE + _FALSE:
        return 1.0 if value.strip() in _TRUE else 0.0
    return None


def _check_unpaired_record(rec: dict, base: Path, root: Path) -> tuple[Optional[tuple[str, str, float]], Optional[str]]:
    missing = [k for k in UNPAIRED_KEYS if rec.get(k) is None]
    if missing:
        return None, f"missing key(s) {', '.join(missing)}"
    if not isinstance(rec["prompt"], str):
        return None, f"prompt must be a string, got {type(rec['prompt']).__name__}"
    label = _label_value(rec["label"])
    if label is None:
        return None, f"label must be 1 or 0 (true or false), got {rec['label']!r}"
    path, problem = local_image(rec["image"], "image", base, root)  # the pair format's rule: inside root
    if problem is not None:
        return None, problem
    return (rec["prompt"], path, label), None


def _load_unpaired_local(path: Path, name: str, cfg: DataConfig) -> UnpairedItems:
    unit, records = read_local_records(path, name, UNPAIRED_KEYS)
    root = image_root(cfg, path.parent)
    rows, numbers, problems, images = [], [], [], []
    for number, rec, problem in records:
        record = None
        if rec is not None:
            record, problem = _check_unpaired_record(rec, path.parent, root)
        rows.append(record)
        numbers.append(number)
        problems.append(problem)
        images.append(None if record is None else [(f"image '{rec['image']}'", record[1])])
    n = len(rows)
    if n == 0:
        raise UserError(f"{name} has no usable items: 0 rows")
    where = RowNamer([name], unit=unit, numbers=np.asarray(numbers, dtype=np.int64))
    bad = np.array([p is not None for p in problems])
    kept, info = select_rows(n, bad, np.zeros(n, bool), problems.__getitem__, FileImages(images), where, name, cfg)
    labels = np.array([rows[int(r)][2] for r in kept], np.float32)
    return UnpairedItems(source=name, rows=rows, row_index=kept, column=np.zeros(len(kept), np.int8),
                         labels=labels, where_row=where, num_rows=n, **info)
