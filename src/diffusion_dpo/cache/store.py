"""The cache's format and its reading side (the layout: `diffusion_dpo.cache`): the manifest, `Cache` (shards
opened lazily and memory-mapped per process), `CachedPairs` (training items) and `cached_inputs` (a cached batch
turned into the latents and conditioning the on-the-fly path computes)."""

from __future__ import annotations

import bisect
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from diffusion_dpo.cache.identity import check_manifest
from diffusion_dpo.cache.mapped import MappedFile
from diffusion_dpo.config import CacheConfig, DataConfig, ModelConfig
from diffusion_dpo.errors import UserError
from diffusion_dpo.models import Family, sample_latents
from diffusion_dpo.randomness import item_draws

CACHE_FORMAT = 3  # 3: an image table (2 stored each pair's posteriors; 1 held SD/SDXL's hidden/pooled only)
READABLE_FORMATS = (2, CACHE_FORMAT)
MANIFEST = "manifest.json"
EMPTY_PROMPT_ROW = 0
TEXT_PREFIX = "text_"  # an item's caption encodings: text_<name> for each of the family's encodings
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}  # cache.dtype auto, by mixed precision
ORIENTED = ("mean", "std", "crop_top_lefts")  # stored (rows, V, ...): V orientations, as is then flipped


def storage_dtype(cache: CacheConfig, mixed_precision: str) -> CacheConfig:
    """`cache` with `dtype` auto made the dtype training under `mixed_precision` casts cached inputs to (text
    encodings are cast to it as they are read; latents enter the denoiser's autocast in it): what a new build
    stores. The measurement behind it: BENCHMARKS.md, "The cache's storage dtype"."""
    if cache.dtype != "auto":
        return cache
    return replace(cache, dtype=AUTO_DTYPES[mixed_precision])


def read_manifest(directory: Path) -> Optional[dict]:
    """The manifest of a complete cache in `directory`, or None when there is none; a cache of a format this
    version cannot read is refused in one line."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise UserError(f"cache.dir '{directory}' has cache format {manifest.get('format')} (this version reads "
                        f"{', '.join(map(str, READABLE_FORMATS))}); rebuild it with `diffusion-dpo cache`")
    return manifest


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
        self._handles: dict[str, MappedFile] = {}

    @classmethod
    def open(cls, model: ModelConfig, data: DataConfig, cache: CacheConfig, mixed_precision: str) -> "Cache":
        """Open `cache.dir` for a run under `mixed_precision`, refusing (one line) a missing cache or one made with
        other settings."""
        directory = Path(cache.dir).expanduser()
        manifest = read_manifest(directory)
        if manifest is None:
            raise UserError(f"cache.dir '{directory}' holds no cache (no {MANIFEST}); build it with "
                            "`diffusion-dpo cache --config ...` or set cache.auto=true")
        check_manifest(manifest, model, data, cache, directory, mixed_precision)
        missing = [f["file"] for f in manifest["pair_files"] + manifest["text_files"] + manifest.get("image_files", [])
                   if not (directory / f["file"]).is_file()]
        if missing:
            raise UserError(f"cache.dir '{directory}' is incomplete: {missing[0]} is missing; rebuild it with "
                            "`diffusion-dpo cache` (after removing the folder)")
        return cls(directory, manifest)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # memory maps do not travel to worker processes

    def _file(self, name: str) -> MappedFile:
        if name not in self._handles:
            self._handles[name] = MappedFile(self.directory / name)
        return self._handles[name]

    def _row(self, files: list[dict], row: int, keys: Optional[tuple[str, ...]] = None,
             orientation: int = 0) -> dict[str, Tensor]:
        """Row `row` of the tensors `keys` (None: all the shard holds); of a tensor stored per orientation, only
        `orientation`'s bytes are read."""
        shard, offset = divmod(row, self.shard_pairs)
        f = self._file(files[shard]["file"])
        if "length" in f.keys():  # captions stored at their own lengths (`pack_ragged`)
            return _read_ragged(f, offset)
        return {k: _read_row(f, k, offset, orientation) for k in (keys or f.keys()) if k in f.keys()}

    def _image(self, row: int, orientation: int) -> dict[str, Tensor]:
        """Row `row` of the image table (format 3) in one orientation."""
        shard = bisect.bisect_right(self._image_starts, row) - 1
        f = self._file(self.manifest["image_files"][shard]["file"])
        offset = row - int(self._image_starts[shard])
        return {k: _read_row(f, k, offset, orientation) for k in ("mean", "std", "crop_top_lefts", "original_sizes")}

    def pair(self, index: int, flipped: bool, empty_prompt: bool) -> dict[str, Tensor]:
        """Pair `index` as one training item's tensors (the orientation and caption already chosen): only the
        chosen orientation's posteriors are read."""
        o = 1 if flipped else 0
        row = self._row(self.manifest["pair_files"], index,
                        ("mean", "std", "crop_top_lefts", "original_sizes", "image", "caption", "label"), o)
        if "image" in row:  # format 3: the pair names its images
            images = [self._image(int(r), o) for r in row.pop("image")]
            row.update({k: torch.stack([im[k] for im in images]) for k in images[0]})  # (G, ...) winner first
        text = self._row(self.manifest["text_files"], EMPTY_PROMPT_ROW if empty_prompt else int(row["caption"]))
        item = {"latent_mean": row["mean"], "latent_std": row["std"],  # (G, C, h, w) winner first
                "crop_top_lefts": row["crop_top_lefts"], "original_sizes": row["original_sizes"],
                "label": float(row["label"])}
        item.update({TEXT_PREFIX + name: t for name, t in text.items()})
        return item


RAGGED = "@tokens"  # suffix of an encoding stored at each caption's own length: (sum of lengths, ...)


def pack_ragged(encodings: dict[str, Tensor]) -> dict[str, Tensor]:
    """Masked encodings (N, L, ...) with "mask" (N, L) as each caption's own tokens: every (N, L, ...) tensor becomes
    `name@tokens` (sum of lengths, ...), the tokens the mask keeps in their order, plus "length" (N,) and L
    "padded_to" (1,); others are kept. A caption takes its tokens' bytes, not L's (an LLM's prompts: ~10x less). Read
    back (`_read_ragged`) a caption's tokens come first, then zeros, and the mask says so: what the family's
    `conditioning` keeps (the masked tokens, in order) is unchanged."""
    keep = encodings["mask"] > 0.5
    n, width = keep.shape
    out = {"length": keep.sum(1).to(torch.int64), "padded_to": torch.tensor([width])}
    for name, t in encodings.items():
        if name == "mask":
            continue
        out[name + RAGGED if t.dim() >= 2 and t.shape[:2] == (n, width) else name] = \
            t[keep] if t.dim() >= 2 and t.shape[:2] == (n, width) else t
    return out


def _read_ragged(f: MappedFile, offset: int) -> dict[str, Tensor]:
    """Row `offset` of a `pack_ragged` file as the encodings it came from: zero-padded back to L with its mask."""
    lengths = f.rows("length", 0, offset + 1)
    start, k = int(lengths[:offset].sum()), int(lengths[offset])
    width = int(f.row("padded_to", 0))
    out = {}
    for key in f.keys():
        if key.endswith(RAGGED):
            tokens = f.rows(key, start, start + k)
            padded = tokens.new_zeros((width, *tokens.shape[1:]))
            padded[:k] = tokens
            out[key[:-len(RAGGED)]] = padded
    mask = torch.zeros(width, dtype=next(iter(out.values())).dtype)
    mask[:k] = 1
    out["mask"] = mask
    return out


def _read_row(f: MappedFile, key: str, offset: int, orientation: int) -> Tensor:
    """Row `offset` of tensor `key` of an open shard. The posteriors and crops are stored (rows, V, ...), V the
    orientations, so one orientation of one row is one contiguous run of bytes: only it is read."""
    return f.row(key, offset, orientation if key in ORIENTED else None)


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
