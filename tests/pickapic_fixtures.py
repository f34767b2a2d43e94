"""Test helpers: Pick-a-Pic-schema parquet files with odd and broken contents, a local tokenizer."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffusion_dpo.testing.tiny_data import SCHEMA

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(colour=RED, size=(40, 32), fmt: str = "PNG") -> bytes:
    """A one-colour image of size (width, height); PNG keeps colours exact."""
    return encode(Image.new("RGB", size, colour), fmt)


def gradient(size=(64, 16), channel: int = 0) -> bytes:
    """PNG whose `channel` at column x is 4*x: every column identifies itself (x < 64)."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :, channel] = (np.arange(w) * 4).astype(np.uint8)[None, :]
    return encode(Image.fromarray(arr))


def gray_png(size=(24, 20)) -> bytes:
    return encode(Image.new("L", size, 128))


def rgba_png(size=(24, 20)) -> bytes:
    """Left half opaque red, right half fully transparent (black underneath): should become white."""
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0, 255)
    return encode(Image.fromarray(arr, "RGBA"))


def palette_png(size=(24, 20), transparent: bool = True) -> bytes:
    img = Image.new("P", size, 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black, 1 green
    img.paste(0, (0, 0, size[0] // 2, size[1]))
    return encode(img, transparency=0) if transparent else encode(img)


def i16_png(size=(24, 20)) -> bytes:
    """16-bit grayscale: left half 65535 (white), right half 0."""
    arr = np.zeros((size[1], size[0]), np.uint16)
    arr[:, : size[0] // 2] = 65535
    return encode(Image.fromarray(arr))


def cmyk_jpeg(size=(24, 20)) -> bytes:
    return encode(Image.new("RGB", size, RED).convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg(size=(40, 20)) -> bytes:
    """Stored as width x height = 40 x 20 with EXIF orientation 6: displayed as 20 x 40."""
    img = Image.new("RGB", size, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes())


def truncated_jpeg(size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


GARBAGE = b"this is not an image" * 4


def row(caption: Optional[str] = "a red square", jpg_0: Optional[bytes] = None, jpg_1: Optional[bytes] = None,
        label_0: Optional[float] = 1.0, label_1: Optional[float] = "auto", **extra) -> dict:
    """A full Pick-a-Pic v2 row (jpg_0 red, jpg_1 blue unless given; label_1 = 1 - label_0 by default)."""
    if label_1 == "auto":
        label_1 = None if label_0 is None else 1.0 - label_0
    out = {
        "are_different": True, "best_image_uid": "u0", "caption": caption,
        "created_at": dt.datetime(2023, 5, 1), "has_label": True,
        "image_0_uid": "u0", "image_0_url": "https://example.invalid/0", "image_1_uid": "u1",
        "image_1_url": "https://example.invalid/1",
        "jpg_0": solid(RED) if jpg_0 is None else jpg_0, "jpg_1": solid(BLUE) if jpg_1 is None else jpg_1,
        "label_0": label_0, "label_1": label_1, "model_0": "m0", "model_1": "m1",
        "ranking_id": 1, "user_id": 2, "num_example_per_prompt": 1,
    }
    out.update(extra)
    return out


def write_pickapic(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    """Write `rows` as a parquet file with the real schema, minus the `drop` columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([f for f in SCHEMA if f.name not in drop])
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in rows],
                                        schema=schema), path)
    return path


def make_tokenizer(max_length: int = 16):
    """A character-level CLIP tokenizer built in memory (transformers 5 API)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
