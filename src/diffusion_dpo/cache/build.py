"""Writing the pre-encoding cache (its layout: `diffusion_dpo.cache`): encoders in fp32, every distinct image and
caption once, shards written as they fill and the progress saved after each, so a killed build continues."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from diffusion_dpo import __version__
from diffusion_dpo.cache.identity import cache_identity, check_manifest, refuse_random_crop
from diffusion_dpo.cache.store import CACHE_FORMAT, DTYPES, EMPTY_PROMPT_ROW, MANIFEST, PROGRESS, read_manifest
from diffusion_dpo.config import CacheConfig, DataConfig, FlowConfig, ModelConfig
from diffusion_dpo.data.items import decode_pair_image, prepare_image
from diffusion_dpo.data.unpaired import load_feedback
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import load_components


def image_key(src: Any) -> tuple[bytes, Any]:
    """(blake2b digest of the encoded image, a source to decode it from): the same bytes are the same image,
    whether they came from a parquet cell or a file, so a repeated image is encoded once."""
    data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
    return hashlib.blake2b(data, digest_size=16).digest(), data


class _ImagesToEncode(torch.utils.data.Dataset):
    """Pair i -> its two images as training pixels, in every stored orientation, with their keys (`image_key`)
    (DataLoader workers decode)."""

    def __init__(self, pairs: Any, resolution: int, orientations: int):
        self.pairs, self.resolution, self.orientations = pairs, resolution, orientations

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        _, sources, label = self.pairs.images(i)
        r, v, g = self.resolution, self.orientations, len(sources)
        pixels = np.zeros((v, g, 3, r, r), np.float32)
        crops = np.zeros((v, g, 2), np.int64)
        sizes = np.zeros((g, 2), np.int64)
        keys = np.zeros((g, 16), np.uint8)
        for k, src in enumerate(sources):
            try:
                digest, data = image_key(src)
            except OSError as exc:  # a path that cannot be read: as a broken image
                raise UserError(f"{self.pairs.where(i)}: image cannot be read ({exc.strerror or exc})") from None
            keys[k] = np.frombuffer(digest, np.uint8)
            img = decode_pair_image(self.pairs, i, data)
            sizes[k] = (img.height, img.width)
            for o in range(v):  # the same function as the uncached loader, with the flip off and on
                pixels[o, k], crops[o, k] = prepare_image(img, r, flip=o == 1, crop_fractions=(None, None))
        return {"pixels": torch.from_numpy(pixels), "crop_top_lefts": torch.from_numpy(crops),
                "original_sizes": torch.from_numpy(sizes), "keys": torch.from_numpy(keys), "label": float(label)}


class _ShardWriter:
    """Collects rows and writes `<prefix>-NNNNN.safetensors` every `rows` rows."""

    def __init__(self, directory: Path, prefix: str, rows: int, files: Optional[list[dict]] = None,
                 on_flush: Any = None):
        self.directory, self.prefix, self.rows = directory, prefix, rows
        self.parts: dict[str, list[Tensor]] = {}
        self.pending = 0
        self.files: list[dict] = list(files or [])  # shards already written (a resumed build)
        self.on_flush = on_flush

    def add(self, **tensors: Tensor) -> None:
        """Append rows (the same number in every tensor); full shards are written as they fill."""
        n, start = next(iter(tensors.values())).shape[0], 0
        while start < n:  # a batch may straddle two shards
            take = min(n - start, self.rows - self.pending)
            for key, t in tensors.items():
                self.parts.setdefault(key, []).append(t[start:start + take])
            self.pending, start = self.pending + take, start + take
            if self.pending == self.rows:
                self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in self.parts.items()}, self.directory / name)
        self.files.append({"file": name, "rows": self.pending})
        self.parts, self.pending = {}, 0
        if self.on_flush is not None:
            self.on_flush(self.files)


def _resume_or_start(tmp: Path, plan: dict, log: Any) -> dict:
    """The progress of an interrupted build of the same plan in `tmp` (its finished shards are kept), or a
    fresh `tmp` and empty progress."""
    path = tmp / PROGRESS
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        saved = None
    if saved is not None and saved.get("plan") == plan:
        done = sum(f["rows"] for f in saved.get("pair_files", []))
        log(f"cache: resuming the interrupted build in {tmp} at pair {done}")
        return saved
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return {"plan": plan}


def _save_progress(tmp: Path, progress: dict) -> None:
    (tmp / (PROGRESS + ".tmp")).write_text(json.dumps(progress))
    os.replace(tmp / (PROGRESS + ".tmp"), tmp / PROGRESS)  # a kill leaves the old or the new, never half


def build_cache(model: ModelConfig, data: DataConfig, cache: CacheConfig, flow: FlowConfig,
                device: torch.device | str = "cpu", log: Any = print) -> Path:
    """Encode every pair of `data` with `model`'s VAE and text encoders into `cache.dir`.

    Reuses a complete cache made with the same settings; refuses one made with other settings. The build
    happens in `<dir>.tmp/`; an interrupted build (killed, disk full) keeps its finished shards there and the
    next build with the same settings continues after them.
    """
    from tqdm.auto import tqdm

    if not cache.dir:
        raise UserError("cache.dir is required (where to write the cache)")
    refuse_random_crop(data)
    directory = Path(cache.dir).expanduser()
    manifest = read_manifest(directory)
    if manifest is not None:
        check_manifest(manifest, model, data, cache, directory)
        log(f"cache {directory}: up to date ({manifest['num_pairs']} pairs)")
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"cache.dir '{directory}' exists and holds no cache (no {MANIFEST}); remove it or choose "
                        "another cache.dir")
    identity = cache_identity(model, data, cache)
    pairs = load_feedback(data)  # pairs, or unpaired items (one image each)
    log(pairs.summary())
    # Captions: unique, row 0 the empty prompt (the caption-dropout replacement).
    rows: dict[str, int] = {"": EMPTY_PROMPT_ROW}
    caption_rows = torch.tensor([rows.setdefault(c, len(rows)) for c in pairs.captions()], dtype=torch.int64)
    texts = list(rows)
    orientations = 2 if data.random_flip else 1
    plan = {"identity": identity, "random_flip": data.random_flip, "shard_pairs": cache.shard_pairs,
            "num_pairs": len(pairs), "num_captions": len(texts)}
    # Encoders in fp32 whatever the training precision: the cache is made once and serves every run.
    comp = load_components(model, torch.float32, device, denoiser=False, flow=flow)
    dtype = DTYPES[cache.dtype]
    tmp = directory.with_name(directory.name + ".tmp")
    try:
        progress = _resume_or_start(tmp, plan, log)
        if "text_files" not in progress:
            writer = _ShardWriter(tmp, "text", cache.shard_pairs)
            step = 4 * cache.batch_size
            for start in tqdm(range(0, len(texts), step), desc="encode captions", unit="batch"):
                encodings = comp.encode_prompt(comp.tokenizer(texts[start:start + step]))
                writer.add(**{name: t.to("cpu", dtype) for name, t in encodings.items()})
            writer.flush()
            progress["text_files"] = writer.files
            _save_progress(tmp, progress)

        # Images shards may end early: each pairs shard is written after every image it names (see below).
        image_writer = _ShardWriter(tmp, "images", cache.shard_pairs, progress.get("image_files"))
        seen = _written_keys(tmp, image_writer.files)  # key -> image row, of a resumed build's finished shards

        def shard_written(files: list[dict]) -> None:
            image_writer.flush()  # the images this pairs shard names are on disk before the progress says so
            progress["pair_files"], progress["image_files"] = files, image_writer.files
            _save_progress(tmp, progress)

        writer = _ShardWriter(tmp, "pairs", cache.shard_pairs, progress.get("pair_files"), shard_written)
        done = sum(f["rows"] for f in writer.files)
        images = _ImagesToEncode(pairs, data.resolution, orientations)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(done, len(pairs))),
                                             batch_size=cache.batch_size, num_workers=data.num_workers)
        for batch in tqdm(loader, desc="encode images", unit="batch"):
            pixels = batch["pixels"]  # (b, V, G, 3, R, R): G = 2 images per pair, 1 per unpaired item
            b, g = pixels.shape[0], pixels.shape[2]
            rows = torch.empty(b, g, dtype=torch.int64)
            new: list[tuple[int, int]] = []  # (pair in batch, image in pair) of images not seen before
            for i in range(b):
                for k in range(g):
                    key = batch["keys"][i, k].numpy().tobytes()
                    if key not in seen:
                        seen[key] = len(seen)
                        new.append((i, k))
                    rows[i, k] = seen[key]
            if new:
                at = (torch.tensor([i for i, _ in new]), slice(None), torch.tensor([k for _, k in new]))
                fresh = pixels[at]  # (m, V, 3, R, R)
                mean, std = comp.posterior(fresh.flatten(0, 1))  # (m*V, C, h, w)
                shape = fresh.shape[:2] + mean.shape[1:]
                image_writer.add(mean=mean.reshape(shape).to("cpu", dtype), std=std.reshape(shape).to("cpu", dtype),
                                 crop_top_lefts=batch["crop_top_lefts"][at],
                                 original_sizes=batch["original_sizes"][at[0], at[2]],
                                 key=batch["keys"][at[0], at[2]])
            writer.add(image=rows, caption=caption_rows[done:done + b], label=batch["label"].float())
            done += b
        writer.flush()  # (an empty data set writes nothing: shard_written is not called)
        image_writer.flush()
        manifest = {
            "format": CACHE_FORMAT, "package_version": __version__, "identity": identity,
            "model.pretrained": model.pretrained, "model.vae": model.vae,
            "random_flip": data.random_flip, "random_crop": False, "family": comp.name,
            "num_pairs": len(pairs), "num_captions": len(texts), "summary": pairs.summary(),
            "images_per_item": pairs.images_per_item,
            "latent_shape": list(comp.latent_shape(data.resolution)), "latent_scale": vars(comp.latent_scale),
            "shard_pairs": cache.shard_pairs, "pair_files": writer.files, "text_files": progress["text_files"],
            "num_images": len(seen), "image_files": image_writer.files,
        }
        (tmp / PROGRESS).unlink()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            directory.rmdir()  # an empty folder the user made
        tmp.rename(directory)  # complete: only now does cache.dir exist
    except OSError as exc:  # disk full, permissions: the finished shards stay in tmp for the next build
        raise UserError(f"cannot write cache.dir '{directory}': {exc.strerror or exc}; finished shards are kept in "
                        f"{tmp} and reused by the next `diffusion-dpo cache`") from None
    log(f"cache {directory}: {len(pairs)} pairs, {len(seen)} distinct images, {len(texts)} unique captions")
    return directory


def _written_keys(tmp: Path, files: list[dict]) -> dict[bytes, int]:
    """key -> image row of the images in the finished shards `files` (a resumed build continues the table)."""
    from safetensors import safe_open

    seen: dict[bytes, int] = {}
    for f in files:
        with safe_open(str(tmp / f["file"]), framework="pt") as shard:
            for key in shard.get_tensor("key"):
                seen[key.numpy().tobytes()] = len(seen)
    return seen
