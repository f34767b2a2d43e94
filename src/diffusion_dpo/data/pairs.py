"""Preference pairs: loading, validation before training, shared augmentation, collate, order.

Sources (`data.path`):
  * Pick-a-Pic v2 schema (`caption`, `jpg_0`, `jpg_1`, `label_0`[, `label_1`], other columns
    ignored) from a .parquet file, a directory of .parquet shards, a `datasets.save_to_disk`
    directory, or a hub dataset id;
  * the local format: JSONL/JSON or CSV with `prompt`, `chosen`, `rejected` image paths
    (relative to the data file), optional `chosen_score` / `rejected_score`.

Data is untrusted (DESIGN.md §7), so it cannot make us read an arbitrary file: table image cells must carry
the image bytes (a cell holding only a path is a bad row), and a local image path must resolve, symlinks
followed, inside the data file's folder or `data.image_root` (`~` is not expanded). Images are opened only
as JPEG, PNG, WebP, GIF or BMP, and at most `images.MAX_IMAGE_PIXELS` pixels.

Everything is validated in `load_preference_pairs`, before any model is loaded: first the cheap
checks (schema, captions, labels, empty images) vectorised over whole Arrow columns, then every
image of every used pair is decoded once in a process pool. A problem stops the run with one
line naming the file, the row (0-based, as pyarrow/pandas count) or line (1-based) and the
problem; `data.skip_bad_rows` drops and counts such rows instead.

Rows stay where they are (Arrow memory map); a pair is `(row, winner is jpg_1?, label)`, so
851K Pick-a-Pic pairs cost a few MB of RAM. Winner first everywhere. An item's randomness
(flip, crop, caption dropout) comes only from its `sample_seed`, so it is reproducible in any
worker and after a resume; `PairSampler` supplies `(pair_index, sample_seed)` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.images import PATH_CELL, FileImages, ImageSource, TableImages, image_source, short_reason
from diffusion_dpo.data.parquet import ParquetTable
from diffusion_dpo.data.row_keys import file_unit
from diffusion_dpo.data.records import (RowNamer, image_root, is_binary, is_number, local_image, read_local_records,
                                        select_rows)
from diffusion_dpo.errors import UserError, is_local_path

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
LOCAL_KEYS = ("prompt", "chosen", "rejected")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")
LABEL_TOL = 1e-6  # labels are floats; 0.5 may arrive as 0.49999999


def row_captions(rows: Any, row_index: np.ndarray) -> list[str]:
    """The captions of `rows` (in-memory (prompt, ...) tuples, or an Arrow table with a caption column) at
    `row_index`, in that order, without touching the images (one Arrow column read)."""
    if isinstance(rows, list):
        return [rows[int(r)][0] for r in row_index]
    table = rows.small if isinstance(rows, ParquetTable) else rows.data
    column = table.column("caption").take(pa.array(row_index))
    return [c if c is not None else "" for c in column.to_pylist()]


@dataclass(eq=False)
class PreferencePairs:
    """Validated pairs, winner first; the rows stay lazily in `rows`.

    `rows` is a datasets.Dataset (caption, jpg_0, jpg_1; images not decoded, Arrow memory map)
    or, for JSONL/CSV, a list of (prompt, chosen path, rejected path) with None for bad lines.
    """

    source: str
    rows: Any
    row_index: np.ndarray  # (N,) int64: the data row of each pair
    winner_is_1: np.ndarray  # (N,) bool: jpg_1 won, so it is swapped to the front
    labels: np.ndarray  # (N,) float32: 1.0 decided pair, 0.5 kept tie
    where_row: RowNamer
    num_rows: int = 0
    num_ties_dropped: int = 0
    num_bad_skipped: int = 0
    first_bad: Optional[str] = None  # the first skipped row's problem, for the summary
    stopped_at_row: Optional[int] = None  # set when data.max_pairs cut the scan short

    def __len__(self) -> int:
        return len(self.row_index)

    images_per_item = 2  # a training item is a pair: winner, loser (unpaired.UnpairedItems has 1)

    def images(self, i: int) -> tuple[str, tuple[ImageSource, ImageSource], float]:
        """(caption, (winner, loser), label) of pair `i`: the interface pairs and unpaired items share."""
        caption, win, lose, label = self.get(i)
        return caption, (win, lose), label

    def get(self, i: int) -> tuple[str, ImageSource, ImageSource, float]:
        """(caption, winner image source, loser image source, label) of pair `i`."""
        row = int(self.row_index[i])
        if isinstance(self.rows, list):
            prompt, win, lose = self.rows[row]
            return prompt, win, lose, float(self.labels[i])
        rec = self.rows[row]
        win, lose = image_source(rec["jpg_0"]), image_source(rec["jpg_1"])
        if self.winner_is_1[i]:
            win, lose = lose, win
        return rec["caption"], win, lose, float(self.labels[i])

    def captions(self) -> list[str]:
        """Every pair's caption, in pair order, without touching the images (one Arrow column read)."""
        return row_captions(self.rows, self.row_index)

    def where(self, i: int) -> str:
        """"<file> row N" of pair `i`, for error messages."""
        return self.where_row(int(self.row_index[i]))

    def summary(self) -> str:
        """One line: rows, pairs used, ties dropped, bad rows skipped."""
        text = f"{self.source}: {self.num_rows} rows, {len(self)} pairs used, {self.num_ties_dropped} ties dropped"
        text += f", {self.num_bad_skipped} bad rows skipped" + (f" (first: {self.first_bad})" if self.first_bad else "")
        if self.stopped_at_row is not None:
            text += f" (data.max_pairs reached at {self.where_row(self.stopped_at_row - 1)})"
        return text


# ---------------------------------------------------------------- loading


def load_preference_pairs(cfg: DataConfig) -> PreferencePairs:
    """Load + validate everything BEFORE training.

    Raises UserError (one line naming file, row and problem) unless cfg.skip_bad_rows.
    """
    spec = cfg.path
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LOCAL_SUFFIXES:
            return _load_local(path, spec, cfg)
        if suffix == ".parquet":
            return _load_parquet([path], [spec], spec, cfg)
        raise UserError(f"data.path '{spec}': unsupported file type '{suffix}' "
                        f"(expected .parquet, .jsonl, .json or .csv)")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, spec, cfg)
        files = parquet_files(path, cfg.split)
        if not files:
            raise UserError(f"data.path '{spec}' is a directory without .parquet files and is not a "
                            f"datasets.save_to_disk directory")
        names = [str(Path(spec) / f.relative_to(path)) for f in files]
        return _load_parquet(files, names, spec, cfg)
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a typo'd path.
    if is_local_path(spec, LOCAL_SUFFIXES + (".parquet", ".arrow")):
        raise UserError(f"data.path '{spec}' not found")
    return _load_hub(spec, cfg)


IN_MEMORY = "in-memory dataset"


def pairs_from_memory(dataset: Any, cfg: DataConfig) -> PreferencePairs:
    """Validated pairs from a `datasets.Dataset` held in memory (`train(cfg, dataset=...)`), checked like a file.

    Schemas: Pick-a-Pic's (caption, jpg_0, jpg_1, label_0[, label_1]), or prompt/chosen/rejected where each image
    is a `datasets.Image` column (PIL images, bytes or paths) or a string path (relative to the working directory,
    and inside it or `data.image_root`, like a data file's paths); the chosen image is the winner. A DatasetDict gives
    its `data.split`. Errors name "in-memory dataset row N"."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if cfg.split not in dataset:
            raise UserError(f"{IN_MEMORY}: split '{cfg.split}' not found (data.split); available splits: "
                            f"{', '.join(dataset.keys())}")
        dataset = dataset[cfg.split]
    if not isinstance(dataset, datasets.Dataset):
        raise UserError(f"{IN_MEMORY}: expected a datasets.Dataset, got {type(dataset).__name__}")
    columns = dataset.column_names
    if "caption" not in columns and all(k in columns for k in LOCAL_KEYS):
        records = _memory_records(dataset)
        if records is not None:  # file paths: checked like a data file's, relative to the working directory
            numbered = [(i, rec, None) for i, rec in enumerate(records)]
            return _local_pairs("row", numbered, IN_MEMORY, Path.cwd(), cfg)
        for key in ("chosen", "rejected"):  # PIL images or bytes -> undecoded image cells
            if not isinstance(dataset.features[key], datasets.Image) or dataset.features[key].decode:
                try:
                    dataset = dataset.cast_column(key, datasets.Image(decode=False))
                except Exception as exc:  # noqa: BLE001 - e.g. numbers where image paths belong
                    raise UserError(f"{IN_MEMORY}: column {key} is not images or image paths "
                                    f"({short_reason(exc)})") from None
        dataset = dataset.select_columns(list(LOCAL_KEYS)).rename_columns(
            {"prompt": "caption", "chosen": "jpg_0", "rejected": "jpg_1"})
        dataset = dataset.add_column("label_0", [1.0] * dataset.num_rows)
        # problems are found in Pick-a-Pic's column names; the user named the columns prompt/chosen/rejected
        def own_names(text: str) -> str:
            return text.replace("jpg_0", "chosen").replace("jpg_1", "rejected").replace("caption is", "prompt is")

        try:
            pairs = _pairs_from_dataset(dataset, RowNamer([IN_MEMORY]), IN_MEMORY, cfg)
        except UserError as exc:
            raise UserError(own_names(str(exc))) from None
        if pairs.first_bad is not None:
            pairs.first_bad = own_names(pairs.first_bad)
        return pairs
    return _pairs_from_dataset(dataset, RowNamer([IN_MEMORY]), IN_MEMORY, cfg)


def _memory_records(dataset: Any) -> Optional[list[dict]]:
    """The rows of an in-memory prompt/chosen/rejected dataset as local records ({prompt, chosen, rejected}, each
    image a path string or bytes) when an image column holds file paths (strings, or image cells with a path and no
    bytes); None when it holds none (the table is then checked as it is, without a copy)."""
    ds = dataset.select_columns(list(LOCAL_KEYS))
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    table = ds.data

    def holds_paths(col: pa.ChunkedArray) -> bool:
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and bool(_path_cells(col).any())

    if not any(holds_paths(table.column(k)) for k in ("chosen", "rejected")):
        return None
    records = table.to_pylist()
    for rec in records:
        for key in ("chosen", "rejected"):
            if isinstance(rec[key], dict):
                rec[key] = rec[key].get("bytes") or rec[key].get("path")
    return records


def parquet_files(root: Path, split: str) -> list[Path]:
    """Sorted .parquet files under `root`, only those of `split` when the names say so."""
    files = sorted((p for p in root.rglob("*.parquet")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())

    def of_split(p: Path) -> bool:
        rel = p.relative_to(root)
        # "train/…", "train.parquet", "train-00000-of-00010.parquet" (but not "train_unique-…")
        return split in rel.parts[:-1] or rel.stem == split or rel.stem.startswith(split + "-")

    chosen = [p for p in files if of_split(p)]
    return chosen or files


def check_schema(schema: pa.Schema, where: str) -> None:
    """Required columns present, with usable types; one line naming `where` otherwise."""
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)}; columns present: "
                        f"{', '.join(names) or '(none)'}")
    for name in ("label_0", "label_1"):
        if name in names:
            t = schema.field(name).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)):
                raise UserError(f"{where}: column {name} has type {t}, expected numbers (1, 0 or 0.5)")
    t = schema.field("caption").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise UserError(f"{where}: column caption has type {t}, expected strings")
    for name in ("jpg_0", "jpg_1"):
        t = schema.field(name).type
        if not (is_binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
            raise UserError(f"{where}: column {name} has type {t}, expected image bytes")


def _load_parquet(files: list[Path], names: list[str], source: str, cfg: DataConfig) -> PreferencePairs:
    starts, total, all_have_label_1, footers = [], 0, True, []
    for f, name in zip(files, names):
        try:
            meta = pq.ParquetFile(f).metadata  # footer only: row counts for "<file> row N"
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            raise UserError(f"{name}: not a readable parquet file ({short_reason(exc)})") from None
        footers.append(meta)
        schema = meta.schema.to_arrow_schema()
        check_schema(schema, name)
        all_have_label_1 &= "label_1" in schema.names
        starts.append(total)
        total += meta.num_rows
    if total == 0:
        raise UserError(f"{source} has no usable pairs: 0 rows")
    small = ["caption", "label_0"] + (["label_1"] if all_have_label_1 else [])
    try:
        # read in place (data/parquet.py): the small columns now, image cells by row group when needed
        table = ParquetTable(files, small, cache_bytes=int(2 * cfg.shuffle_window_mb * 2**20), metadata=footers)
    except Exception as exc:  # noqa: BLE001 - e.g. shards with different column types
        raise UserError(f"{source}: could not read the parquet files ({short_reason(exc)})") from None
    # the image check remembers each file's rows by the file's path, size and modification time
    units = [(file_unit(f), start) for f, start in zip(files, starts)]
    # image cells are checked row by row with the images (reading them all now would read every image's bytes)
    return _pairs_from_table(table.small, table, TableImages(table, units=units), RowNamer(names, starts), source,
                             cfg, cell_columns=())


def _load_saved(path: Path, source: str, cfg: DataConfig) -> PreferencePairs:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{source}: cannot load the datasets.save_to_disk directory ({short_reason(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(f"{source}: split '{cfg.split}' not found (data.split); available splits: "
                            f"{', '.join(ds.keys())}")
        ds = ds[cfg.split]
    return _pairs_from_dataset(ds, RowNamer([source]), source, cfg)


def _load_hub(spec: str, cfg: DataConfig) -> PreferencePairs:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=cfg.split, revision=cfg.revision)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no such split, ...
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise UserError(f"data.path '{spec}' is not a local file or directory and could not be loaded "
                        f"from the hub: {reason}") from None
    return _pairs_from_dataset(ds, RowNamer([spec]), spec, cfg)


def _pairs_from_dataset(ds: Any, where: RowNamer, source: str, cfg: DataConfig) -> PreferencePairs:
    """Vectorised checks over the Arrow columns, then image decoding of the used pairs."""
    import datasets

    check_schema(ds.data.schema, source)
    if ds.num_rows == 0:
        raise UserError(f"{source} has no usable pairs: 0 rows")
    for name in ("jpg_0", "jpg_1"):  # keep encoded bytes: decoding happens in our workers
        if isinstance(ds.features.get(name), datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    ds = ds.select_columns([c for c in (*REQUIRED_COLUMNS, "label_1") if c in ds.column_names])
    if getattr(ds, "_indices", None) is not None:  # a selected/shuffled view: ds.data would be the parent
        ds = ds.flatten_indices()
    return _pairs_from_table(ds.data, ds, TableImages(ds), where, source, cfg, cell_columns=("jpg_0", "jpg_1"))


def _pairs_from_table(table: pa.Table, rows: Any, images: TableImages, where: RowNamer, source: str,
                      cfg: DataConfig, cell_columns: tuple[str, ...]) -> PreferencePairs:
    """The checks of whole Arrow columns (captions, labels, and the image cells of `cell_columns`, cheap in an Arrow
    memory map), then the image check of the used rows; `rows` serves the pairs' rows to training."""
    n = table.num_rows

    cap_null = table.column("caption").is_null().to_numpy(zero_copy_only=False)
    l0 = table.column("label_0").cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    l0_nan = np.isnan(l0)
    near = lambda v: np.abs(l0 - v) <= LABEL_TOL  # noqa: E731
    l0_bad = ~l0_nan & ~(near(0.0) | near(0.5) | near(1.0))
    checks: list[tuple[np.ndarray, Any]] = [
        (cap_null, lambda r: "caption is null"),
        (l0_nan, lambda r: "label_0 is null or NaN"),
        (l0_bad, lambda r: f"label_0 is {l0[r]:g}, expected 0, 0.5 or 1"),
    ]
    if "label_1" in table.column_names:
        l1 = table.column("label_1").cast(pa.float64()).to_numpy(zero_copy_only=False)
        l1_bad = ~l0_nan & ~l0_bad & ~(np.abs(l1 - (1.0 - l0)) <= LABEL_TOL)  # NaN compares False
        checks.append((l1_bad, lambda r: f"label_1 is {l1[r]:g} but label_0 is {l0[r]:g} "
                                         f"(label_1 must be 1 - label_0)"))
    for name in cell_columns:
        checks += image_cell_checks(table.column(name), name)

    bad = np.logical_or.reduce([mask for mask, _ in checks])

    def problem(row: int) -> str:
        return next(msg(row) for mask, msg in checks if mask[row])

    tie = near(0.5) & ~bad
    kept, info = select_rows(n, bad, tie, problem, images, where, source, cfg)
    return PreferencePairs(source=source, rows=rows, row_index=kept, winner_is_1=near(0.0)[kept],
                           labels=np.where(tie[kept], 0.5, 1.0).astype(np.float32), where_row=where,
                           num_rows=n, **info)


def _empty_images(col: pa.ChunkedArray) -> np.ndarray:
    """(rows,) bool: the image cell has neither bytes nor a path."""
    def empty(arr: Any) -> np.ndarray:
        return pc.fill_null(pc.equal(pc.binary_length(arr), 0), True).to_numpy(zero_copy_only=False)

    if is_binary(col.type):
        return empty(col)
    out = col.is_null().to_numpy(zero_copy_only=False) | empty(pc.struct_field(col, "bytes"))
    if col.type.get_field_index("path") >= 0:
        out &= empty(pc.struct_field(col, "path")) | col.is_null().to_numpy(zero_copy_only=False)
    return out


def _path_cells(col: pa.ChunkedArray) -> np.ndarray:
    """(rows,) bool: the image cell has a path but no bytes. Such a path is never opened: it could name any file."""
    if is_binary(col.type) or col.type.get_field_index("path") < 0:
        return np.zeros(len(col), bool)
    no_bytes = pc.fill_null(pc.equal(pc.binary_length(pc.struct_field(col, "bytes")), 0), True)
    has_path = pc.fill_null(pc.greater(pc.binary_length(pc.struct_field(col, "path")), 0), False)
    return pc.and_(no_bytes, has_path).to_numpy(zero_copy_only=False) & ~col.is_null().to_numpy(zero_copy_only=False)


def image_cell_checks(col: pa.ChunkedArray, name: str) -> list[tuple[np.ndarray, Callable[[int], str]]]:
    """The bad-row checks of table image column `name`: (mask, problem) for empty cells and for path-only cells."""
    return [(_empty_images(col), lambda r: f"{name} is null or empty"),
            (_path_cells(col), lambda r: f"{name} {PATH_CELL}")]


# ---------------------------------------------------------------- local JSONL / CSV


def _check_local(rec: dict, base: Path, root: Path) -> tuple[Optional[tuple[str, Any, Any]], Optional[str]]:
    """A local record -> ((prompt, chosen, rejected), None) or (None, problem). Images are paths, checked with
    `local_image`, or bytes (an in-memory dataset's image cells)."""
    missing = [k for k in LOCAL_KEYS if rec.get(k) is None]
    if missing:
        return None, f"missing key(s) {', '.join(missing)}"
    if not isinstance(rec["prompt"], str):
        return None, f"prompt must be a string, got {type(rec['prompt']).__name__}"
    for key in ("chosen_score", "rejected_score"):
        if rec.get(key) is not None and not is_number(rec[key]):
            return None, f"{key} must be a number, got {rec[key]!r}"
    images = []
    for key in ("chosen", "rejected"):
        value = rec[key]
        if isinstance(value, bytes) and value:
            images.append(value)
            continue
        path, problem = local_image(value, key, base, root)
        if problem is not None:
            return None, problem
        images.append(path)
    return (rec["prompt"], images[0], images[1]), None


def _load_local(path: Path, name: str, cfg: DataConfig) -> PreferencePairs:
    unit, records = read_local_records(path, name, LOCAL_KEYS)
    return _local_pairs(unit, records, name, path.parent, cfg)


def _local_pairs(unit: str, records: list, name: str, base: Path, cfg: DataConfig) -> PreferencePairs:
    """Pairs from local records [(number, record or None, problem or None)], image paths relative to `base`."""
    root = image_root(cfg, base)
    rows, numbers, problems, images = [], [], [], []
    for number, rec, problem in records:
        record = None
        if rec is not None:
            record, problem = _check_local(rec, base, root)
        rows.append(record)
        numbers.append(number)
        problems.append(problem)
        images.append(None if record is None else
                      [(f"{key} image '{rec[key]}'" if isinstance(rec[key], str) else key, src)
                       for key, src in (("chosen", record[1]), ("rejected", record[2]))])
    n = len(rows)
    if n == 0:
        raise UserError(f"{name} has no usable pairs: 0 rows")
    where = RowNamer([name], unit=unit, numbers=np.asarray(numbers, dtype=np.int64))
    bad = np.array([p is not None for p in problems])
    kept, info = select_rows(n, bad, np.zeros(n, bool), problems.__getitem__, FileImages(images), where, name, cfg)
    return PreferencePairs(source=name, rows=rows, row_index=kept, winner_is_1=np.zeros(len(kept), bool),
                           labels=np.ones(len(kept), np.float32), where_row=where, num_rows=n, **info)
