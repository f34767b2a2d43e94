"""A tiny synthetic preference data set in the real Pick-a-Pic v2 schema (offline demo, tests).

The preference is learnable: the prompt names a colour and a shape ("a red circle on a white
background"); the winner draws exactly that (with jitter and noise), the loser gets the wrong
colour, the wrong shape, or is blurred. Images come in assorted sizes (not all square), mostly
JPEG with some PNG, and jpg_0 is the winner about half the time, so the loader's winner-first
swap is exercised. Deterministic from the seed.

    diffusion-dpo make-tiny --output-dir tiny      # models + this data set in tiny/pickapic
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from diffusion_dpo.data.schema import SCHEMA, pickapic_row

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
# (width, height) at resolution 32; scaled with the requested resolution.
SIZES = ((32, 32), (40, 32), (32, 48), (48, 40), (36, 36))

def draw_shape(size: tuple[int, int], colour: tuple[int, int, int], shape: str,
               rng: np.random.Generator) -> Image.Image:
    """`shape` in `colour` on a white background, with jittered position/size and pixel noise."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, png: bool) -> bytes:
    buf = io.BytesIO()
    if png:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pair(rng: np.random.Generator, scale: float) -> tuple[str, Image.Image, Image.Image]:
    """(caption, winner, loser) for one random prompt."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    w, h = SIZES[rng.integers(len(SIZES))]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    winner = draw_shape(size, COLOURS[colour], shape, rng)
    flaw = rng.integers(3)  # how the loser fails the prompt
    if flaw == 0:
        other = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
        loser = draw_shape(size, COLOURS[other], shape, rng)
    elif flaw == 1:
        other = [s for s in SHAPES if s != shape][rng.integers(len(SHAPES) - 1)]
        loser = draw_shape(size, COLOURS[colour], other, rng)
    else:
        loser = draw_shape(size, COLOURS[colour], shape, rng).filter(ImageFilter.GaussianBlur(min(size) / 8))
    return f"a {colour} {shape} on a white background", winner, loser


def build_tiny_pickapic(out_dir: Path, num_pairs: int = 64, resolution: int = 32, seed: int = 0,
                        num_shards: int = 2, tie_fraction: float = 0.1) -> Path:
    """Write `out_dir/train-0000X-of-0000N.parquet` shards with every Pick-a-Pic v2 column; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = resolution / 32
    models = ("sd-1.5", "sdxl-beta", "dreamlike-2.0")
    t0 = dt.datetime(2023, 6, 1)
    rows = []
    for i in range(num_pairs):
        caption, winner, loser = _pair(rng, scale)
        tie = rng.random() < tie_fraction
        first_wins = rng.random() < 0.5
        img0, img1 = (winner, loser) if first_wins else (loser, winner)
        label_0 = 0.5 if tie else float(first_wins)
        uid0, uid1 = f"{seed:04d}-{i:05d}-0", f"{seed:04d}-{i:05d}-1"
        # the random draws in their original order: formats, models, user (the data stay as they were)
        jpg_0, jpg_1 = _encode(img0, png=rng.random() < 0.25), _encode(img1, png=rng.random() < 0.25)
        model_0, model_1 = models[rng.integers(len(models))], models[rng.integers(len(models))]
        user_id = int(rng.integers(1, 50))
        rows.append(pickapic_row(caption, jpg_0, jpg_1, label_0, uid0, uid1, t0 + dt.timedelta(minutes=int(i)),
                                 1000 + i, user_id, model_0, model_1, url_0=f"https://example.invalid/{uid0}.png",
                                 url_1=f"https://example.invalid/{uid1}.png"))
    bounds = np.linspace(0, num_pairs, num_shards + 1).round().astype(int)
    for k in range(num_shards):
        shard = rows[bounds[k]:bounds[k + 1]]
        table = pa.Table.from_pylist(shard, schema=SCHEMA)
        pq.write_table(table, out_dir / f"train-{k:05d}-of-{num_shards:05d}.parquet")
    return out_dir
