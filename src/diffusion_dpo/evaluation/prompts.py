"""Prompt sets for generation and evaluation: one list of `{"prompt": str, ...}` dicts, in file order.

Kinds (`kind="auto"` picks by suffix):

    text      .txt      one prompt per line; blank lines are skipped
    jsonl     .jsonl    one JSON object per line with a `prompt` string (its other string/number fields kept,
                        e.g. `category`), as `generate` manifests and the demo's eval_prompts.jsonl hold them
    parti     .tsv      PartiPrompts: tab-separated with a `Prompt` column (`Category`, `Challenge` kept)
    hpsv2     .json     HPSv2 benchmark: a JSON list of strings (category = file stem), a JSON object
                        {category: [prompts]}, or a directory of such .json files (sorted by name)
    pickapic  .parquet  Pick-a-Pic captions: a parquet file, a directory of shards or a
                        `datasets.save_to_disk` directory; only the `caption` column is read;
                        empty captions dropped, duplicates removed keeping the first occurrence

Malformed input ends in one `UserError` line naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Optional

from diffusion_dpo.errors import UserError

Prompt = dict  # {"prompt": str, optional "category": str, ...}

KINDS = ("text", "jsonl", "parti", "hpsv2", "pickapic")


def load_prompts(path: str | Path, kind: str = "auto", limit: Optional[int] = None,
                 split: Optional[str] = None) -> list[Prompt]:
    """Read a prompt set; the first `limit` prompts (after de-duplication for Pick-a-Pic).

    `split` picks Pick-a-Pic shards or a DatasetDict split by name (e.g. "validation_unique").
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"prompt file '{path}' does not exist")
    if limit is not None and limit < 1:
        raise UserError(f"prompt limit must be a positive integer, got {limit}")
    if kind == "auto":
        kind = _detect(path)
    readers: dict[str, Callable[[Path], list[Prompt]]] = {
        "text": _read_text, "jsonl": _read_jsonl, "parti": _read_parti, "hpsv2": _read_hpsv2,
        "pickapic": lambda p: _read_pickapic(p, split)}
    if kind not in readers:
        raise UserError(f"unknown prompt kind '{kind}'; choose one of auto, {', '.join(KINDS)}")
    prompts = readers[kind](path)
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts")
    return prompts[:limit] if limit is not None else prompts


def _detect(path: Path) -> str:
    """The kind from the suffix (or, for a directory, from what it holds)."""
    if path.is_dir():
        if any(path.glob("*.json")) and not (path / "dataset_dict.json").exists() \
                and not (path / "state.json").exists():
            return "hpsv2"
        return "pickapic"
    by_suffix = {".txt": "text", ".jsonl": "jsonl", ".tsv": "parti", ".json": "hpsv2", ".parquet": "pickapic"}
    kind = by_suffix.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"prompt file '{path}': cannot tell its kind from the suffix '{path.suffix}' "
                        f"(.txt, .jsonl, .tsv, .json, .parquet or a directory); pass the kind ({', '.join(KINDS)})")
    return kind


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file '{path}' is not UTF-8 text (byte {exc.start})") from None


def _read_text(path: Path) -> list[Prompt]:
    return [{"prompt": line.strip()} for line in _read_utf8(path).splitlines() if line.strip()]


def _read_jsonl(path: Path) -> list[Prompt]:
    """One JSON object per line with a non-empty `prompt` string; other scalar fields are kept (a manifest's
    file, seed and settings are not prompt fields and are dropped)."""
    out = []
    dropped = {"file", "seed", "prompt_index"}
    for line_no, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file '{path}' line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise UserError(f"prompt file '{path}' line {line_no}: expected an object with a non-empty \"prompt\" "
                            "string")
        out.append({"prompt": item["prompt"].strip(),
                    **{k: v for k, v in item.items() if k != "prompt" and k not in dropped
                       and isinstance(v, (str, int, float)) and not isinstance(v, bool)}})
    return out


def _read_parti(path: Path) -> list[Prompt]:
    """PartiPrompts.tsv: header `Prompt\tCategory\tChallenge\tNote`; only `Prompt` is required."""
    lines = _read_utf8(path).splitlines()
    # QUOTE_NONE: Parti prompts contain bare double quotes that are not CSV quoting
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows, None)
    if header is None or "Prompt" not in header:
        raise UserError(f"prompt file '{path}' line 1: a PartiPrompts TSV needs a 'Prompt' column in its header; "
                        f"found {header or 'nothing'}")
    col = {name: i for i, name in enumerate(header)}
    out = []
    for line_no, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"prompt file '{path}' line {line_no}: {len(row)} tab-separated fields, "
                            f"the header has {len(header)}")
        prompt = row[col["Prompt"]].strip()
        if not prompt:
            raise UserError(f"prompt file '{path}' line {line_no}: empty Prompt")
        item = {"prompt": prompt}
        for key in ("Category", "Challenge"):
            if key in col and row[col[key]].strip():
                item[key.lower()] = row[col[key]].strip()
        out.append(item)
    return out


def _read_hpsv2(path: Path) -> list[Prompt]:
    """An HPSv2 benchmark file (list of strings, category = stem), an object of lists, or a dir of them."""
    if path.is_dir():
        return [p for f in sorted(path.glob("*.json")) for p in _read_hpsv2(f)]
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file '{path}' line {exc.lineno}: not valid JSON ({exc.msg})") from None
    groups = data.items() if isinstance(data, dict) else [(path.stem, data)]
    out = []
    for category, prompts in groups:
        if not isinstance(prompts, list):
            raise UserError(f"prompt file '{path}': expected a JSON list of prompt strings"
                            + (f" under '{category}'" if isinstance(data, dict) else ""))
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"prompt file '{path}': item {i}" + (f" of '{category}'" if isinstance(data, dict)
                                                                     else "") + " is not a non-empty string")
            out.append({"prompt": prompt.strip(), "category": str(category)})
    return out


def _read_pickapic(path: Path, split: Optional[str]) -> list[Prompt]:
    """Unique non-empty captions of a Pick-a-Pic copy, in row order."""
    captions = _pickapic_captions(path, split)
    seen: set[str] = set()
    out = []
    for caption in captions:
        text = (caption or "").strip()
        if text and text not in seen:  # Pick-a-Pic repeats a caption once per image pair
            seen.add(text)
            out.append({"prompt": text})
    return out


def _pickapic_captions(path: Path, split: Optional[str]) -> list[Optional[str]]:
    import pyarrow.parquet as pq

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise UserError(f"prompt data '{path}': choose a split ({', '.join(ds)})"
                                + (f"; '{split}' is not one" if split else ""))
            ds = ds[split]
        if "caption" not in ds.column_names:
            raise UserError(f"prompt data '{path}' has no 'caption' column ({', '.join(ds.column_names)})")
        return list(ds.select_columns(["caption"])["caption"])
    if path.is_dir():
        from diffusion_dpo.data.pairs import parquet_files  # the same shard/split selection as training data

        files = parquet_files(path, split or "")
        if not files:
            raise UserError(f"prompt data '{path}' is a directory without .parquet files, .json prompt files "
                            "or a datasets.save_to_disk copy")
    else:
        files = [path]
    captions: list[Optional[str]] = []
    for f in files:
        try:
            table = pq.read_table(f, columns=["caption"])  # the image columns are never read
        except Exception as exc:  # noqa: BLE001 - a missing column or a corrupt file
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"prompt data '{f}': cannot read a 'caption' column ({first})") from None
        captions.extend(table.column("caption").to_pylist())
    return captions
