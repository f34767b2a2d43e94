"""Image helpers for the preference data: robust decoding to RGB, resize/crop, and the parallel
decode-every-image check that runs before training.

No torchvision: PIL does the decoding and resampling, numpy the conversion to [-1, 1].
Everything here is torch-free so that the image-validation worker processes start fast.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

from diffusion_dpo.data.row_keys import digest64, file_unit, mix

# An image source as stored in the data: encoded bytes (Pick-a-Pic) or a file path (local format).
ImageSource = Union[bytes, str, Path]


# The formats data may hold. Image.open would otherwise try every plugin PIL has, EPS among them (handed to
# Ghostscript where it is installed): untrusted data must only meet the decoders a data set needs (DESIGN.md §7).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# The most pixels an image may have, checked from its header before anything is decoded. Pick-a-Pic images are
# ~1 MP (768-1024 px a side); 64 MiP (8192 x 8192) leaves room for any real training image while a forged header
# cannot make a worker allocate gigabytes (PIL's own guard only refuses above ~179 MP).
MAX_IMAGE_PIXELS = 64 * 2**20


class ImageTooLarge(ValueError):
    """An image whose header declares more than MAX_IMAGE_PIXELS pixels."""


def open_image(src: ImageSource) -> Image.Image:
    """Open an encoded image (bytes or path) lazily, only as one of IMAGE_FORMATS and at most MAX_IMAGE_PIXELS
    pixels; nothing is decoded yet. Raises PIL's UnidentifiedImageError for another format, ImageTooLarge."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(src)), formats=IMAGE_FORMATS)
    else:
        img = Image.open(src, formats=IMAGE_FORMATS)
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLarge(f"image is {width} x {height} = {width * height} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS} allowed")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, EXIF orientation applied, transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(_high_depth_to_uint8(np.asarray(img), mode), mode="L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath; white is what viewers show.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8 (PIL's own convert would clip, not scale).

    No float64 copies: integers scale exactly in 32-bit integers (round(v * 255 / 65535) == (v + 128) // 257, as 65535 =
    255 * 257 and v / 257 never ends in .5), floats in one float32 copy changed in place."""
    if mode == "F":
        out = np.array(arr, dtype=np.float32)  # a writable copy
        # Float images are either in [0, 1] (linear exports) or already in [0, 255].
        if out.size and np.nanmax(out) <= 1.0:
            out *= 255.0
        np.clip(out, 0, 255, out=out)  # +-inf -> 255 / 0; NaN stays, then 0 (nan_to_num would allocate 3 masks)
        np.copyto(out, 0, where=np.isnan(out))
        return np.rint(out, out=out).astype(np.uint8)
    # 16-bit PNGs (and the "I" mode PIL sometimes gives them) span 0..65535; "I" (int32) may hold more or less:
    # clipped, in one int32 copy.
    out = np.clip(arr, 0, 65535) if mode == "I" else arr.astype(np.uint32)
    out += 128
    out //= 257
    return out.astype(np.uint8)


def load_rgb(src: ImageSource) -> Image.Image:
    """Decode an image source fully into RGB (raises PIL/OS errors on a broken file)."""
    with open_image(src) as img:
        img.load()
        return to_rgb(img)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the short side equals `size`, keeping the aspect ratio."""
    w, h = img.size
    short = min(w, h)
    if short == size:
        return img
    new = (max(size, round(w * size / short)), max(size, round(h * size / short)))
    # Lanczos anti-aliases when shrinking (Pick-a-Pic images are ~768 px); bicubic when enlarging.
    resample = Image.Resampling.LANCZOS if short > size else Image.Resampling.BICUBIC
    return img.resize(new, resample=resample)


def crop_offsets(width: int, height: int, size: int, frac_top: Optional[float],
                 frac_left: Optional[float]) -> tuple[int, int]:
    """(top, left) of a `size` crop: centered when the fractions are None, else frac * slack."""
    slack_h, slack_w = height - size, width - size
    if frac_top is None or frac_left is None:
        return int(round(slack_h / 2.0)), int(round(slack_w / 2.0))
    # floor(u * (slack + 1)) is uniform over 0..slack for u in [0, 1).
    return min(int(frac_top * (slack_h + 1)), slack_h), min(int(frac_left * (slack_w + 1)), slack_w)


def to_unit_range(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 array (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return (arr / 127.5 - 1.0).transpose(2, 0, 1).copy()


def verify_image(src: ImageSource, draft_size: int = 64) -> Optional[str]:
    """Decode `src` completely and return None, or a short reason why it cannot be used.

    JPEGs are decoded with `Image.draft` at reduced DCT scale (much faster); libjpeg still reads
    the whole entropy-coded stream, so a truncated file is still detected (tested).
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have relaxed it globally
    try:
        with open_image(src) as img:
            if img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            rgb = to_rgb(img)
            if rgb.width < 1 or rgb.height < 1:
                return "image has zero size"
        return None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unusable image"
        return short_reason(exc)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


_NOISE = re.compile(r"\s*(<_io\.\w+ object at 0x[0-9a-fA-F]+>|'[^']*'|\"[^\"]*\")")


def short_reason(exc: BaseException) -> str:
    """First line of an exception message without object reprs or file names (we name the row)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _NOISE.sub("", text).strip() or type(exc).__name__


PATH_CELL = "holds a file path, not image bytes (table data must carry the encoded image)"


def image_source(value: object) -> Optional[bytes]:
    """A stored table image cell -> its encoded bytes: raw bytes, or the bytes of a datasets Image dict
    {"bytes", "path"}. A cell with only a path gives None: a path in a data table is never opened, as it could name
    any file on this machine (DESIGN.md §7); `cell_problem` says why."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray, memoryview)):
        return bytes(value["bytes"]) or None
    return None


def cell_problem(value: object) -> Optional[str]:
    """None when the table image cell `value` holds image bytes, else why not (to follow the column's name)."""
    if image_source(value) is not None:
        return None
    if isinstance(value, dict) and value.get("path"):
        return PATH_CELL
    return "is null or empty"


# ---------------------------------------------------------------- parallel validation
# Readers hand a worker the image sources of some rows; they must pickle cheaply (a
# memory-mapped datasets.Dataset pickles as its file paths) and live here, in a torch-free
# module, so worker processes start in well under a second.

class TableImages:
    """Image sources of rows of a datasets.Dataset whose image columns are not decoded.

    `units`: [(identity, first row)] of the files the rows come from (ascending first rows), for `row_keys`; default:
    one unit, the dataset's Arrow files (path, size, modification time), or its fingerprint when it has none."""

    def __init__(self, dataset: object, columns: Sequence[str] = ("jpg_0", "jpg_1"),
                 units: Optional[Sequence[tuple[int, int]]] = None):
        self.dataset = dataset.select_columns(list(columns))
        self.columns = tuple(columns)
        if units is None:
            files = [f["filename"] for f in getattr(dataset, "cache_files", None) or []]
            text = "\0".join(str(file_unit(f)) for f in files) if files else f"fp:{dataset._fingerprint}"
            units = [(digest64(text), 0)]
        self.units = list(units)

    def row_keys(self, rows: np.ndarray) -> np.ndarray:
        """A 64-bit key per row that changes when the file holding it changes (`image_checks`)."""
        starts = np.array([s for _, s in self.units], np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        ids = np.array([u for u, _ in self.units], np.uint64)[which]
        return mix(ids, rows - starts[which])

    def sources(self, rows: Sequence[int]) -> list[list[tuple[str, Optional[ImageSource]]]]:
        """For each row, [(column name, source, None or why the cell holds no image bytes), ...]."""
        batch = self.dataset[[int(r) for r in rows]]  # dict of column -> list
        return [[(c, image_source(batch[c][i]), cell_problem(batch[c][i])) for c in self.columns]
                for i in range(len(rows))]


class FileImages:
    """Image sources of local-format rows: [(what, path), (what, path)] per row (None for bad rows)."""

    def __init__(self, pairs: Sequence[Optional[Sequence[tuple[str, str]]]]):
        self.pairs = list(pairs)

    def sources(self, rows: Sequence[int]) -> list[list[tuple[str, Optional[ImageSource]]]]:
        """For each row, [(description, path), ...]."""
        return [list(self.pairs[int(r)]) for r in rows]

    def row_keys(self, rows: np.ndarray) -> np.ndarray:
        """A 64-bit key per row from its image files' paths, sizes and modification times (`image_checks`); a file
        that cannot be read gets a key never seen again (it is checked each time)."""
        import time

        keys = []
        for r in rows:
            parts = []
            for _, path in self.pairs[int(r)]:
                try:
                    parts.append(str(file_unit(path)))
                except OSError:
                    parts.append(f"unreadable {path} {time.time_ns()}")
            keys.append(digest64("\0".join(parts)))
        return np.array(keys, np.uint64)


_READER = None  # set once per worker process by the pool initializer


def _init_worker(reader: object) -> None:
    global _READER
    _READER = reader


def _check_rows(rows: np.ndarray, reader: object = None) -> list[tuple[int, str]]:
    """(row, problem) for each row among `rows` with an image that does not decode."""
    reader = reader if reader is not None else _READER
    bad = []
    for row, pair in zip(rows, reader.sources(rows)):
        for what, src, *cell in pair:
            if cell and cell[0]:  # a table cell without image bytes (`cell_problem`)
                bad.append((int(row), f"{what} {cell[0]}"))
                break
            reason = "no image data" if src is None else verify_image(src)
            if reason is not None:
                bad.append((int(row), f"{what} cannot be decoded as an image ({reason})"))
                break  # one problem per row is enough
    return bad


def find_bad_images(reader: object, rows: np.ndarray, num_workers: int,
                    stop_at_first: bool) -> tuple[list[tuple[int, str]], int]:
    """Decode every image of `rows` (ascending); return [(row, problem)] in row order and how many of the first rows
    were checked (all, unless stopped).

    Uses `num_workers` processes (0: in this process). With `stop_at_first`, stops after the
    first chunk that has a bad row, so the first bad row in row order is always reported.
    """
    rows = np.asarray(rows, dtype=np.int64)
    chunk = int(np.clip(len(rows) // max(1, 8 * num_workers), 4, 64))
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    bar = tqdm(total=2 * len(rows), desc="validating images", unit="img",
               disable=2 * len(rows) <= 2000)
    pool = None
    # Starting processes costs ~1 s; for a few dozen pairs it is faster to decode here.
    if num_workers > 0 and len(rows) >= 32:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        # Not fork: the parent may hold torch/tokenizer threads, and fork+threads can deadlock.
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context(method),
                                   initializer=_init_worker, initargs=(reader,))
        results = pool.map(_check_rows, chunks)
    else:
        results = (_check_rows(c, reader) for c in chunks)
    bad: list[tuple[int, str]] = []
    checked = 0
    try:
        for part, found in zip(chunks, results):
            bad.extend(found)
            checked += len(part)
            bar.update(2 * len(part))
            if found and stop_at_first:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return bad, checked
