"""The checks every data format shares, in one place: which rows are used (ties dropped, bad rows refused in one
line or skipped and counted, every image of a used row decoded once in a process pool, `data.max_pairs`), how a row
is named in an error ("<file> row N", "<file> line N"), how JSONL/CSV records are read, and where a local image path
may point (inside the data file's folder or `data.image_root`, symlinks followed). Pairs (`pairs`) and unpaired
items (`unpaired`) both load through them."""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.image_checks import check_images
from diffusion_dpo.data.images import short_reason
from diffusion_dpo.errors import UserError


@dataclass
class RowNamer:
    """Global row -> "<file> row N" (row within its parquet shard) or "<file> line N"."""

    names: list[str]
    starts: list[int] = field(default_factory=lambda: [0])
    unit: str = "row"
    numbers: Optional[np.ndarray] = None  # local files: the line (or item) of each row

    def __call__(self, row: int) -> str:
        if self.numbers is not None:
            return f"{self.names[0]} {self.unit} {int(self.numbers[row])}"
        k = bisect.bisect_right(self.starts, row) - 1
        return f"{self.names[k]} {self.unit} {row - self.starts[k]}"


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or \
        getattr(pa.types, "is_binary_view", lambda _: False)(t)


def select_rows(n: int, bad: np.ndarray, tie: np.ndarray, problem: Any, images: Any, where: RowNamer,
            source: str, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    """Choose the used rows (in row order): drop ties, check images, apply max_pairs, count.

    Returns (kept rows, counters for PreferencePairs). Raises on the first bad row unless
    skip_bad_rows; only rows up to the last kept pair are examined when max_pairs cuts early.
    """
    candidates = np.flatnonzero(~bad & (~tie | cfg.keep_ties))
    limit = cfg.max_pairs
    if not cfg.skip_bad_rows:
        end = candidates[limit - 1] + 1 if limit and len(candidates) >= limit else n
        first = np.flatnonzero(bad[:end])
        if first.size:  # cheap checks fail fast, before any image is decoded
            raise UserError(f"{where(int(first[0]))}: {problem(int(first[0]))}")
    kept_parts, failures, pos, count = [], [], 0, 0
    while pos < len(candidates) and (limit is None or count < limit):
        chunk = candidates[pos:pos + (len(candidates) - pos if limit is None else limit - count)]
        pos += len(chunk)
        found = check_images(images, chunk, cfg.num_workers, not cfg.skip_bad_rows, source) \
            if cfg.image_check == "before" else []
        if found and not cfg.skip_bad_rows:
            raise UserError(f"{where(found[0][0])}: {found[0][1]}")
        failures.extend(found)
        chunk = chunk[~np.isin(chunk, [r for r, _ in found])]
        kept_parts.append(chunk)
        count += len(chunk)
    kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, np.int64)
    cut = limit is not None and len(kept) == limit and kept[-1] + 1 < n
    end = int(kept[-1]) + 1 if cut else n
    num_ties = 0 if cfg.keep_ties else int(tie[:end].sum())
    bad_rows = [(int(r), problem(int(r))) for r in np.flatnonzero(bad[:end])[:1]] + failures
    first_bad = min(bad_rows) if bad_rows else None
    info = dict(num_ties_dropped=num_ties, num_bad_skipped=int(bad[:end].sum()) + len(failures),
                first_bad=f"{where(first_bad[0])}: {first_bad[1]}" if first_bad else None,
                stopped_at_row=end if cut else None)
    if len(kept) == 0:
        if num_ties and not info["num_bad_skipped"]:
            raise UserError(f"{source}: all {num_ties} pairs are ties (label 0.5); set data.keep_ties=true to use them")
        text = f"{source} has no usable pairs: {n} rows, {num_ties} ties dropped, {info['num_bad_skipped']} bad rows"
        raise UserError(text + (f" skipped (first: {info['first_bad']})" if info["first_bad"] else ""))
    return kept.astype(np.int64), info


def read_local_records(path: Path, name: str, keys: tuple[str, ...]
                   ) -> tuple[str, list[tuple[int, Optional[dict], Optional[str]]]]:
    """("line" or "item", [(number, record or None, problem or None)]) for each non-blank record; a CSV header
    without the columns `keys` is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{name}: cannot read ({short_reason(exc)})") from None
    out: list[tuple[int, Optional[dict], Optional[str]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted fields may span lines
        missing = [k for k in keys if k not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{name}: missing column(s) {', '.join(missing)}; columns present: "
                            f"{', '.join(reader.fieldnames or []) or '(none)'}")
        for rec in reader:
            # An empty cell means "absent" (like a missing JSON key), except for the prompt: "" is valid.
            out.append((reader.line_num, {k: v for k, v in rec.items()
                                          if k is not None and (v not in (None, "") or k == "prompt")}, None))
        return "line", out
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a JSON array, not JSON lines
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{name} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        for i, item in enumerate(items):
            out.append((i, item, None) if isinstance(item, dict) else
                       (i, None, f"expected a JSON object, got {type(item).__name__}"))
        return "item", out
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append((number, None, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        out.append((number, item, None) if isinstance(item, dict) else
                   (number, None, f"expected a JSON object, got {type(item).__name__}"))
    return "line", out


def is_number(value: Any) -> bool:
    """A finite int/float, or a string holding one (CSV cells are strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def image_root(cfg: DataConfig, folder: Path) -> Path:
    """The resolved folder that local image paths must lie in: data.image_root, else `folder` (the data file's)."""
    if cfg.image_root is None:
        return folder.resolve()
    root = Path(cfg.image_root).expanduser()  # the user's own setting: ~ is theirs (data paths get no expansion)
    if not root.is_dir():
        raise UserError(f"data.image_root '{cfg.image_root}' is not a directory")
    return root.resolve()


def local_image(value: Any, key: str, base: Path, root: Path) -> tuple[Optional[str], Optional[str]]:
    """A data file's image path -> (resolved path, None) or (None, problem).

    Relative to `base` (the data file's folder), `~` not expanded; the file it resolves to, symlinks followed, must
    lie inside `root` (see `image_root`), checked before the file is looked at, so data cannot probe other files."""
    if not isinstance(value, str) or not value.strip():
        return None, f"{key} must be an image path (a non-empty string), got {value!r}"
    try:
        path = (base / value).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        return None, f"image path {value!r} cannot be resolved ({short_reason(exc)})"
    if not path.is_relative_to(root):
        return None, f"image {value!r} lies outside {root} (set data.image_root to allow another folder)"
    if not path.is_file():
        return None, f"image file {value!r} not found"
    return str(path), None
