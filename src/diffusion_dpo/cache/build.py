"""Writing the pre-encoding cache (its layout: `diffusion_dpo.cache`), by one process or by every process of an
`accelerate launch`, each its share.

The work is cut into chunks that do not depend on the number of processes, so 1 or N processes write the same
files and a killed build resumes on any number of them, losing at most the chunk each process was writing:

1. keys: each chunk of `cache.shard_pairs` pairs gives its images' keys (blake2b of the encoded bytes: the same
   bytes are the same image) and labels, `keys-NNNNN.npz` (reading and hashing, no decoding);
2. every process reads all the keys and numbers the distinct images in order of first use (the image table);
3. encode: chunks of `cache.shard_pairs` captions (`text-NNNNN`) and of `cache.shard_pairs` table rows
   (`images-NNNNN`), the text encoders in the run's dtype and the VAE in fp32 (as training encodes without a
   cache); each process takes its share of the chunks not yet on disk;
4. the main process writes the pairs shards (table rows, caption rows, labels) and the manifest, then renames
   `<dir>.tmp` to `<dir>`.

Every file is written whole (temporary name, then rename), so what is on disk is finished. Errors on any process
(a broken image, a full disk) are raised as one line on all of them (`processes.agree`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from diffusion_dpo import __version__
from diffusion_dpo.cache.chunks import (PLAN, ChunkWriter, chunk, num_chunks, open_plan, save_arrays_whole,
                                       save_whole, written)
from diffusion_dpo.cache.identity import cache_identity, check_manifest, refuse_random_crop
from diffusion_dpo.cache.store import (CACHE_FORMAT, DTYPES, EMPTY_PROMPT_ROW, MANIFEST, pack_ragged, read_manifest,
                                        storage_dtype)
from diffusion_dpo.config import CacheConfig, DataConfig, FlowConfig, ModelConfig
from diffusion_dpo.data.image_checks import shared_by
from diffusion_dpo.data.items import decode_pair_image, prepare_image
from diffusion_dpo.data.unpaired import load_feedback
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import load_components, weight_dtype_of
from diffusion_dpo.processes import Share


def image_key(src: Any) -> tuple[bytes, bytes]:
    """(blake2b digest of the encoded image, its bytes): the same bytes are the same image, whether they came from
    a parquet cell or a file, so a repeated image is encoded once."""
    data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
    return hashlib.blake2b(data, digest_size=16).digest(), data


def _read_image(pairs: Any, i: int, src: Any) -> tuple[bytes, bytes]:
    """`image_key(src)` of an image of pair `i`; a path that cannot be read is a one-line error, as a broken image."""
    try:
        return image_key(src)
    except OSError as exc:
        raise UserError(f"{pairs.where(i)}: image cannot be read ({exc.strerror or exc})") from None


def _write_keys(pairs: Any, chunk: range, path: Path) -> None:
    """The keys (n, G, 16) and labels (n,) of the pairs in `chunk`."""
    keys = np.zeros((len(chunk), pairs.images_per_item, 16), np.uint8)
    labels = np.zeros(len(chunk), np.float32)
    for n, i in enumerate(chunk):
        _, sources, labels[n] = pairs.images(i)
        for k, src in enumerate(sources):
            keys[n, k] = np.frombuffer(_read_image(pairs, i, src)[0], np.uint8)
    save_arrays_whole({"keys": keys, "labels": labels}, path)


def image_table(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, firsts) for image keys (N, G, 16): rows (N, G) numbers the distinct keys in order of first use;
    firsts (M,) is where (flat index i*G + g) each distinct image is first used."""
    flat = np.ascontiguousarray(keys.reshape(-1, 16)).view(np.dtype((np.void, 16))).ravel()
    if not len(flat):
        return np.zeros(keys.shape[:2], np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct keys by first use
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()].reshape(keys.shape[:2]).astype(np.int64), first[order].astype(np.int64)


def _read_keys(files: list[Path], images_per_item: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys (N, G, 16) and labels (N,) of every pair, from the chunk files in order."""
    keys, labels = [np.zeros((0, images_per_item, 16), np.uint8)], [np.zeros(0, np.float32)]
    for f in files:
        with np.load(f) as saved:
            keys.append(saved["keys"])
            labels.append(saved["labels"])
    return np.concatenate(keys), np.concatenate(labels)


class _ImagesToEncode(torch.utils.data.Dataset):
    """Image table row r -> its training pixels in every stored orientation, crops, size and key (DataLoader workers
    decode). `firsts[r]` is where the image is first used (pair * G + image in the pair)."""

    def __init__(self, pairs: Any, firsts: np.ndarray, resolution: int, orientations: int):
        self.pairs, self.firsts, self.resolution, self.orientations = pairs, firsts, resolution, orientations

    def __len__(self) -> int:
        return len(self.firsts)

    def __getitem__(self, row: int) -> dict[str, Any]:
        i, k = divmod(int(self.firsts[row]), self.pairs.images_per_item)
        digest, data = _read_image(self.pairs, i, self.pairs.images(i)[1][k])
        img = decode_pair_image(self.pairs, i, data)
        r, v = self.resolution, self.orientations
        pixels, crops = np.zeros((v, 3, r, r), np.float32), np.zeros((v, 2), np.int64)
        for o in range(v):  # the same function as the uncached loader, with the flip off and on
            pixels[o], crops[o] = prepare_image(img, r, flip=o == 1, crop_fractions=(None, None))
        return {"pixels": torch.from_numpy(pixels), "crop_top_lefts": torch.from_numpy(crops),
                "original_sizes": torch.tensor([img.height, img.width]),
                "key": torch.from_numpy(np.frombuffer(digest, np.uint8).copy())}


def build_cache(model: ModelConfig, data: DataConfig, cache: CacheConfig, flow: FlowConfig,
                device: torch.device | str = "cpu", log: Any = print, state: Any = None,
                mixed_precision: str = "no") -> Path:
    """Encode every pair of `data` with `model`'s VAE and text encoders into `cache.dir`; with `state` (accelerate's
    process state under `accelerate launch`) every process encodes its share. Every process must call it.
    `mixed_precision`: the training's (train.mixed_precision), which cache.dtype auto follows.

    Reuses a complete cache made with the same settings; refuses one made with other settings. The build happens in
    `<dir>.tmp/`; an interrupted build (killed, disk full) keeps its finished chunks there and the next build with
    the same settings, on any number of processes, continues after them.
    """
    if not cache.dir:
        raise UserError("cache.dir is required (where to write the cache)")
    refuse_random_crop(data)
    procs = Share(state)
    log = log if procs.is_main else (lambda *a, **k: None)
    directory = Path(cache.dir).expanduser()
    tmp = directory.with_name(directory.name + ".tmp")
    kept = (f"cache.dir '{directory}'", tmp, "diffusion-dpo cache")  # where a failed write's finished chunks wait
    wanted, cache = cache, storage_dtype(cache, mixed_precision)  # an existing cache is checked against `wanted`
    identity = cache_identity(model, data, cache, mixed_precision)
    size = cache.shard_pairs
    plan = {"format": CACHE_FORMAT, "identity": identity, "random_flip": data.random_flip, "shard_pairs": size}

    def prepare() -> Optional[dict]:
        manifest = read_manifest(directory)
        if manifest is not None:
            check_manifest(manifest, model, data, wanted, directory, mixed_precision)
            return manifest
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise UserError(f"cache.dir '{directory}' exists and holds no cache (no {MANIFEST}); remove it or choose "
                            "another cache.dir")
        written(lambda: open_plan(tmp, plan, "cache", log), *kept)
        return None

    manifest = procs.main_does(prepare)
    if manifest is not None:
        log(f"cache {directory}: up to date ({manifest['num_pairs']} pairs)")
        return directory

    def load() -> Any:
        with shared_by(procs.state):  # the image check, split over the processes
            return load_feedback(data)  # pairs, or unpaired items (one image each)

    pairs = procs.all_do(load)
    log(pairs.summary())
    # Captions: unique, row 0 the empty prompt (the caption-dropout replacement).
    caption_row: dict[str, int] = {"": EMPTY_PROMPT_ROW}
    caption_rows = np.array([caption_row.setdefault(c, len(caption_row)) for c in pairs.captions()], np.int64)
    texts = list(caption_row)
    pair_chunks = num_chunks(size, len(pairs))

    # 1. keys
    key_file = [tmp / f"keys-{c:05d}.npz" for c in range(pair_chunks)]
    mine = procs.of_missing(list(range(pair_chunks)), lambda c: key_file[c].is_file())
    procs.all_do(lambda: written(lambda: [_write_keys(pairs, chunk(c, size, len(pairs)), key_file[c])
                                          for c in mine], *kept))
    # 2. the image table, the same on every process
    keys, labels = _read_keys(key_file, pairs.images_per_item)
    rows, firsts = image_table(keys)

    # 3. encode this process's share of the caption and image chunks not yet written
    text_chunks, image_chunks = num_chunks(size, len(texts)), num_chunks(size, len(firsts))
    mine = procs.of_missing([("text", j) for j in range(text_chunks)] + [("images", j) for j in range(image_chunks)],
                            lambda task: (tmp / f"{task[0]}-{task[1]:05d}.safetensors").is_file())

    def encode() -> None:
        if not mine:
            return
        # the encoders in the precision training runs them in (`load_components`: text encoders in the run's dtype,
        # the VAE in fp32), so cached and live inputs are the same to float noise
        comp = load_components(model, weight_dtype_of(mixed_precision), device, denoiser=False, flow=flow)
        dtype = DTYPES[cache.dtype]
        for kind, j in mine:
            if kind == "text":
                _encode_texts(comp, texts[j * size:(j + 1) * size], 4 * cache.batch_size, dtype,
                              tmp / f"text-{j:05d}.safetensors")
        images = [j for kind, j in mine if kind == "images"]
        _encode_images(comp, _ImagesToEncode(pairs, firsts, data.resolution, 2 if data.random_flip else 1),
                       [chunk(j, size, len(firsts)) for j in images],
                       [tmp / f"images-{j:05d}.safetensors" for j in images], cache.batch_size, data.num_workers,
                       dtype, show=procs.is_main)

    procs.all_do(lambda: written(encode, *kept))

    # 4. pairs shards, manifest, rename (the main process)
    def finish() -> int:
        # the family, latent shape and scale: from the configs (no encoder loaded for them)
        comp, pair_files = load_components(model, denoiser=False, encoders=False, flow=flow), []
        for c in range(pair_chunks):
            span = chunk(c, size, len(pairs))
            name = f"pairs-{c:05d}.safetensors"
            save_whole({"image": torch.from_numpy(rows[span.start:span.stop]),
                        "caption": torch.from_numpy(caption_rows[span.start:span.stop]),
                        "label": torch.from_numpy(labels[span.start:span.stop])}, tmp / name)
            pair_files.append({"file": name, "rows": len(span)})
        files = lambda prefix, total: [{"file": f"{prefix}-{j:05d}.safetensors",  # noqa: E731
                                        "rows": len(chunk(j, size, total))} for j in range(num_chunks(size, total))]
        done = {
            "format": CACHE_FORMAT, "package_version": __version__, "identity": identity,
            "model.pretrained": model.pretrained, "model.vae": model.vae,
            "random_flip": data.random_flip, "random_crop": False, "family": comp.name,
            "num_pairs": len(pairs), "num_captions": len(texts), "summary": pairs.summary(),
            "images_per_item": pairs.images_per_item,
            "latent_shape": list(comp.latent_shape(data.resolution)), "latent_scale": comp.latent_scale.to_json(),
            "shard_pairs": size, "pair_files": pair_files, "text_files": files("text", len(texts)),
            "num_images": len(firsts), "image_files": files("images", len(firsts)),
        }
        for f in key_file:
            f.unlink()
        (tmp / PLAN).unlink()
        (tmp / MANIFEST).write_text(json.dumps(done, indent=1))
        if directory.exists():
            directory.rmdir()  # an empty folder the user made
        tmp.rename(directory)  # complete: only now does cache.dir exist
        return len(firsts)

    num_images = procs.main_does(lambda: written(finish, *kept))
    log(f"cache {directory}: {len(pairs)} pairs, {num_images} distinct images, {len(texts)} unique captions")
    return directory


def _encode_texts(comp: Any, texts: list[str], batch: int, dtype: torch.dtype, path: Path) -> None:
    """One chunk of captions through the family's text encoders, written whole. Encodings that come with a "mask"
    (an LLM's tokens, real ones first: Z-Image, Qwen-Image) are stored at each caption's own length
    (`store.pack_ragged`), not padded to max_sequence_length."""
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(texts), batch):
        for name, t in comp.encode_prompt(comp.tokenizer(texts[start:start + batch])).items():
            parts.setdefault(name, []).append(t.to("cpu", dtype))
    whole = {name: torch.cat(ts) for name, ts in parts.items()}
    save_whole(pack_ragged(whole) if "mask" in whole else whole, path)


def _encode_images(comp: Any, images: _ImagesToEncode, chunks: list[range], paths: list[Path], batch_size: int,
                   num_workers: int, dtype: torch.dtype, show: bool) -> None:
    """Image table chunks through the VAE (DataLoader workers decode), each chunk written whole as it completes."""
    from tqdm.auto import tqdm

    batches = [list(chunk[s:s + batch_size]) for chunk in chunks for s in range(0, len(chunk), batch_size)]
    if not batches:
        return
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers)
    writer = ChunkWriter([len(c) for c in chunks], paths)
    for batch in tqdm(loader, desc="encode images", unit="batch", disable=not show):
        pixels = batch["pixels"]  # (b, V, 3, R, R)
        mean, std = comp.posterior(pixels.flatten(0, 1))  # (b*V, C, h, w)
        shape = pixels.shape[:2] + mean.shape[1:]
        writer.add(mean=mean.reshape(shape).to("cpu", dtype), std=std.reshape(shape).to("cpu", dtype),
                   crop_top_lefts=batch["crop_top_lefts"], original_sizes=batch["original_sizes"], key=batch["key"])
