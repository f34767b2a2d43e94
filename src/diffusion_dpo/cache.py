"""The pre-encoding cache: every pair's images as VAE posteriors and every caption as text-encoder outputs,
encoded once, then read memory-mapped by training, which never loads the VAE or the text encoders.

    diffusion-dpo cache --config configs/sd15_pickapic.yaml --cache.dir cache/pickapic-sd15
    diffusion-dpo train --config configs/sd15_pickapic.yaml --cache.dir cache/pickapic-sd15

Layout of `cache.dir` (safetensors shards, opened lazily with `safe_open`, so only the rows a batch
needs are paged in):

    manifest.json            what it was made with (see `cache_identity`) and its shapes
    images-00000.safetensors every distinct image once (same bytes, same image), in order of first use:
        mean, std            (m, V, C, h, w)     VAE posterior; V orientations ([as is] or [as is, flipped]
                                                 with data.random_flip)
        crop_top_lefts       (m, V, 2)           SDXL crop offsets as seen after the flip
        original_sizes       (m, 2)              the image's (h, w) before resizing
        key                  (m, 16)             blake2b digest of the encoded image (a resumed build's lookup)
    pairs-00000.safetensors  `cache.shard_pairs` pairs each, in pair order:
        image                (n, 2)              rows of the image table, winner first (1 per unpaired item)
        caption              (n,)                row of the caption table
        label                (n,)                1 for a decided pair, 0.5 for a kept tie
    text-00000.safetensors   unique captions (row 0 is the empty prompt): the model family's per-prompt encodings
                             (`Family.encode_prompt`): SD hidden (m, 77, D); SDXL hidden, pooled; SD3 clip
                             (m, 77, 2048), pooled, t5 (m, L, 4096) unless model.t5 false; FLUX pooled, t5

Why an image table: an image is often in several pairs (`iterate`'s every-two-of-K pairing puts each sample in
K - 1 of them, 7 at K = 8; Pick-a-Pic repeats images too), and each is encoded and stored once. Caches of format
2 (each pair holding its two posteriors) are still read.

Why posterior parameters and not latents: the posterior sample is drawn per pair and epoch from the
pair's sample seed (`randomness.pair_noise`) with the same formula as on the fly (`models.sample_latents`),
so a cached run stays stochastic and equals an uncached one up to float noise. Why both orientations: a
VAE is not flip-equivariant, so the flipped image is encoded too. Random crops are refused: a crop drawn
per pair and epoch has too many positions to pre-encode exactly. Captions are deduplicated (Pick-a-Pic v2
has ~15x fewer unique captions than pairs); the empty-prompt swap is drawn at train time
(`randomness.item_draws`) and picks row 0.

The cache is written as `<dir>.tmp/` and renamed when complete, so a killed build never leaves a cache
that looks usable; the next build with the same settings continues after the last finished shard.
"""

from __future__ import annotations

import bisect
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
from diffusion_dpo.config import Config
from diffusion_dpo.errors import UserError
from diffusion_dpo.fingerprint import component_fingerprint, data_fingerprint
from diffusion_dpo.data.items import decode_pair_image, prepare_image
from diffusion_dpo.data.unpaired import load_feedback
from diffusion_dpo.models import Family, describe, load_components, sample_latents
from diffusion_dpo.randomness import item_draws

CACHE_FORMAT = 3  # 3: an image table (2 stored each pair's posteriors; 1 held SD/SDXL's hidden/pooled only)
READABLE_FORMATS = (2, CACHE_FORMAT)
MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # in <dir>.tmp/ while building: the finished shards, so a killed build resumes
EMPTY_PROMPT_ROW = 0
TEXT_PREFIX = "text_"  # an item's caption encodings: text_<name> for each of the family's encodings
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolved(spec: Optional[str]) -> Optional[str]:
    """A local path made absolute (so the same data or model named two ways matches); hub ids as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def cache_identity(cfg: Config) -> dict[str, Any]:
    """What a cache depends on, keyed by the setting a user would change; a training run must agree on all."""
    d = cfg.data
    index, family = describe(cfg.model)
    return {
        "model family": family.name,
        "model (VAE, text encoders, tokenizers)": component_fingerprint(cfg.model, family.encoder_roles(index,
                                                                                                         cfg.model)),
        "model.variant": cfg.model.variant,
        **family.encoding_identity(cfg.model),
        "data.path": _resolved(d.path),
        "data files": data_fingerprint(d.path),
        "data.split": d.split, "data.keep_ties": d.keep_ties, "data.skip_bad_rows": d.skip_bad_rows,
        "data.max_pairs": d.max_pairs,
        **({"data.unpaired": True} if d.unpaired else {}),  # only when set: caches made before it stay valid
        # the folder local image paths must lie in decides which rows are bad (and skipped); a hub set's commit
        **({"data.image_root": str(Path(d.image_root).resolve())} if d.image_root else {}),
        **({"data.revision": d.revision} if d.revision else {}),
        "data.resolution": d.resolution,
        "cache.dtype": cfg.cache.dtype,
    }


def _refuse_random_crop(cfg: Config) -> None:
    if cfg.data.random_crop:
        raise UserError("data.random_crop: the cache stores center crops (and their flips); a crop drawn per pair "
                        "and epoch cannot be pre-encoded exactly. Set data.random_crop=false or train without "
                        "cache.dir")


def check_manifest(manifest: dict, cfg: Config, directory: Path) -> None:
    """Refuse, in one line naming the setting, a cache made with other weights, data, resolution or dtype."""
    where = f"cache.dir '{directory}'"
    if manifest.get("format") not in READABLE_FORMATS:
        raise UserError(f"{where} has cache format {manifest.get('format')} (this version reads "
                        f"{', '.join(map(str, READABLE_FORMATS))}); rebuild it with `diffusion-dpo cache`")
    _refuse_random_crop(cfg)
    made = manifest["identity"]
    for key, value in cache_identity(cfg).items():
        if made.get(key) != value:
            raise UserError(f"{where} was made with {key} = {made.get(key)!r}, this run has {value!r}; rebuild it "
                            "with `diffusion-dpo cache` or point cache.dir elsewhere")
    if cfg.data.random_flip and not manifest["random_flip"]:
        raise UserError(f"{where} was made with data.random_flip = false (no flipped encodings), this run has true; "
                        "rebuild it with data.random_flip=true or set data.random_flip=false")


def read_manifest(directory: Path) -> Optional[dict]:
    """The manifest of a complete cache in `directory`, or None when there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


# ---------------------------------------------------------------- building


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


def build_cache(cfg: Config, device: torch.device | str = "cpu", log: Any = print) -> Path:
    """Encode every pair of `cfg.data` with `cfg.model`'s VAE and text encoders into `cfg.cache.dir`.

    Reuses a complete cache made with the same settings; refuses one made with other settings. The build
    happens in `<dir>.tmp/`; an interrupted build (killed, disk full) keeps its finished shards there and the
    next build with the same settings continues after them.
    """
    from tqdm.auto import tqdm

    if not cfg.cache.dir:
        raise UserError("cache.dir is required (where to write the cache)")
    _refuse_random_crop(cfg)
    directory = Path(cfg.cache.dir).expanduser()
    manifest = read_manifest(directory)
    if manifest is not None:
        check_manifest(manifest, cfg, directory)
        log(f"cache {directory}: up to date ({manifest['num_pairs']} pairs)")
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"cache.dir '{directory}' exists and holds no cache (no {MANIFEST}); remove it or choose "
                        "another cache.dir")
    identity = cache_identity(cfg)
    pairs = load_feedback(cfg.data)  # pairs, or unpaired items (one image each)
    log(pairs.summary())
    # Captions: unique, row 0 the empty prompt (the caption-dropout replacement).
    rows: dict[str, int] = {"": EMPTY_PROMPT_ROW}
    caption_rows = torch.tensor([rows.setdefault(c, len(rows)) for c in pairs.captions()], dtype=torch.int64)
    texts = list(rows)
    orientations = 2 if cfg.data.random_flip else 1
    plan = {"identity": identity, "random_flip": cfg.data.random_flip, "shard_pairs": cfg.cache.shard_pairs,
            "num_pairs": len(pairs), "num_captions": len(texts)}
    # Encoders in fp32 whatever the training precision: the cache is made once and serves every run.
    comp = load_components(cfg.model, torch.float32, device, denoiser=False, flow=cfg.flow)
    dtype = DTYPES[cfg.cache.dtype]
    tmp = directory.with_name(directory.name + ".tmp")
    try:
        progress = _resume_or_start(tmp, plan, log)
        if "text_files" not in progress:
            writer = _ShardWriter(tmp, "text", cfg.cache.shard_pairs)
            step = 4 * cfg.cache.batch_size
            for start in tqdm(range(0, len(texts), step), desc="encode captions", unit="batch"):
                encodings = comp.encode_prompt(comp.tokenizer(texts[start:start + step]))
                writer.add(**{name: t.to("cpu", dtype) for name, t in encodings.items()})
            writer.flush()
            progress["text_files"] = writer.files
            _save_progress(tmp, progress)

        # Images shards may end early: each pairs shard is written after every image it names (see below).
        image_writer = _ShardWriter(tmp, "images", cfg.cache.shard_pairs, progress.get("image_files"))
        seen = _written_keys(tmp, image_writer.files)  # key -> image row, of a resumed build's finished shards

        def shard_written(files: list[dict]) -> None:
            image_writer.flush()  # the images this pairs shard names are on disk before the progress says so
            progress["pair_files"], progress["image_files"] = files, image_writer.files
            _save_progress(tmp, progress)

        writer = _ShardWriter(tmp, "pairs", cfg.cache.shard_pairs, progress.get("pair_files"), shard_written)
        done = sum(f["rows"] for f in writer.files)
        images = _ImagesToEncode(pairs, cfg.data.resolution, orientations)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(done, len(pairs))),
                                             batch_size=cfg.cache.batch_size, num_workers=cfg.data.num_workers)
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
            "model.pretrained": cfg.model.pretrained, "model.vae": cfg.model.vae,
            "random_flip": cfg.data.random_flip, "random_crop": False, "family": comp.name,
            "num_pairs": len(pairs), "num_captions": len(texts), "summary": pairs.summary(),
            "images_per_item": pairs.images_per_item,
            "latent_shape": list(comp.latent_shape(cfg.data.resolution)), "latent_scale": vars(comp.latent_scale),
            "shard_pairs": cfg.cache.shard_pairs, "pair_files": writer.files, "text_files": progress["text_files"],
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


# ---------------------------------------------------------------- reading


class Cache:
    """A complete cache opened for reading; shard files are opened lazily (per process: DataLoader workers
    open their own memory maps)."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.num_pairs: int = manifest["num_pairs"]
        self.shard_pairs: int = manifest["shard_pairs"]
        self.orientations = 2 if manifest["random_flip"] else 1
        self.family: str = manifest["family"]
        self.images_per_item: int = manifest.get("images_per_item", 2)  # caches before unpaired items held pairs
        # format 3: the first image row of each image shard (they may end early), for `_image`; format 2: none
        self._image_starts = list(np.cumsum([0] + [f["rows"] for f in manifest.get("image_files", [])])[:-1])
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, cfg: Config) -> "Cache":
        """Open `cfg.cache.dir`, refusing (one line) a missing cache or one made with other settings."""
        directory = Path(cfg.cache.dir).expanduser()
        manifest = read_manifest(directory)
        if manifest is None:
            raise UserError(f"cache.dir '{directory}' holds no cache (no {MANIFEST}); build it with "
                            "`diffusion-dpo cache --config ...` or set cache.auto=true")
        check_manifest(manifest, cfg, directory)
        missing = [f["file"] for f in manifest["pair_files"] + manifest["text_files"] + manifest.get("image_files", [])
                   if not (directory / f["file"]).is_file()]
        if missing:
            raise UserError(f"cache.dir '{directory}' is incomplete: {missing[0]} is missing; rebuild it with "
                            "`diffusion-dpo cache` (after removing the folder)")
        return cls(directory, manifest)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # memory maps do not travel to worker processes

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.directory / name), framework="pt")
        return self._handles[name]

    def _row(self, files: list[dict], row: int, keys: Optional[tuple[str, ...]] = None) -> dict[str, Tensor]:
        """Row `row` of the tensors `keys` (None: all the shard holds)."""
        shard, offset = divmod(row, self.shard_pairs)
        f = self._file(files[shard]["file"])
        return {k: f.get_slice(k)[offset:offset + 1][0] for k in (keys or f.keys()) if k in f.keys()}

    def _image(self, row: int) -> dict[str, Tensor]:
        """Row `row` of the image table (format 3)."""
        shard = bisect.bisect_right(self._image_starts, row) - 1
        f = self._file(self.manifest["image_files"][shard]["file"])
        offset = row - int(self._image_starts[shard])
        return {k: f.get_slice(k)[offset:offset + 1][0] for k in ("mean", "std", "crop_top_lefts", "original_sizes")}

    def pair(self, index: int, flipped: bool, empty_prompt: bool) -> dict[str, Tensor]:
        """Pair `index` as one training item's tensors (the orientation and caption already chosen)."""
        row = self._row(self.manifest["pair_files"], index,
                        ("mean", "std", "crop_top_lefts", "original_sizes", "image", "caption", "label"))
        if "image" in row:  # format 3: the pair names its images; stack them as format 2 stores them
            images = [self._image(int(r)) for r in row.pop("image")]
            row.update(mean=torch.stack([im["mean"] for im in images], 1),  # (V, G, C, h, w)
                       std=torch.stack([im["std"] for im in images], 1),
                       crop_top_lefts=torch.stack([im["crop_top_lefts"] for im in images], 1),  # (V, G, 2)
                       original_sizes=torch.stack([im["original_sizes"] for im in images]))  # (G, 2)
        o = 1 if flipped else 0
        text = self._row(self.manifest["text_files"], EMPTY_PROMPT_ROW if empty_prompt else int(row["caption"]))
        item = {"latent_mean": row["mean"][o], "latent_std": row["std"][o],  # (2, C, h, w) winner first
                "crop_top_lefts": row["crop_top_lefts"][o], "original_sizes": row["original_sizes"],
                "label": float(row["label"])}
        item.update({TEXT_PREFIX + name: t for name, t in text.items()})
        return item


class CachedPairs(torch.utils.data.Dataset):
    """The cached counterpart of `data.PreferenceDataset`: items keyed by (pair_index, sample_seed), with the
    flip and the empty-prompt swap drawn by the same `randomness.item_draws`."""

    def __init__(self, cache: Cache, random_flip: bool, proportion_empty_prompts: float):
        self.cache, self.random_flip, self.proportion_empty_prompts = cache, random_flip, proportion_empty_prompts

    def __len__(self) -> int:
        return self.cache.num_pairs

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        draws = item_draws(seed, self.random_flip, False, self.proportion_empty_prompts)
        item = self.cache.pair(index, draws.flip, draws.empty_prompt)
        item["sample_seed"] = int(seed) & 0x7FFFFFFFFFFFFFFF  # as PreferenceDataset: the key of the pair's noise
        return item


def cached_inputs(batch: dict[str, Any], posterior_eps: Tensor, family: Family, resolution: int,
                  device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Any]:
    """Latents (2B, C, h, w) as [winners; losers] and their conditioning from a cached batch: the same
    `sample_latents` and `Family.conditioning` as the on-the-fly path."""
    def both(t: Tensor) -> Tensor:  # (B, G, ...) -> (GB, ...) winners first (G = 1: unpaired items)
        return torch.cat(t.unbind(1)).to(device, non_blocking=True)

    latents = sample_latents(both(batch["latent_mean"]).float(), both(batch["latent_std"]).float(), posterior_eps,
                             family.latent_scale)
    encodings = {key[len(TEXT_PREFIX):]: t.to(device, dtype, non_blocking=True) for key, t in batch.items()
                 if key.startswith(TEXT_PREFIX)}
    return latents, family.conditioning(encodings, batch["original_sizes"], batch["crop_top_lefts"], resolution)
