"""Training items from validated pairs: decoded, augmented (one flip and crop shared by both images of a pair),
tokenized; their collation (packed into one buffer for DataLoader workers); and the sampler that orders and shards
(pair, sample seed) keys over processes so that a resume continues at the same pair."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.config import DataConfig
from diffusion_dpo.data.images import (ImageSource, crop_offsets, load_rgb, resize_short_side, short_reason,
                                       to_unit_range)
from diffusion_dpo.data.pairs import PreferencePairs
from diffusion_dpo.data.parquet import Locality, ParquetTable
from diffusion_dpo.errors import UserError
from diffusion_dpo.randomness import item_draws


class PreferenceDataset(torch.utils.data.Dataset):
    """Decoded, augmented, tokenized pairs; items are keyed by (pair_index, sample_seed).

    `tokenize` is the model family's prompt tokenizer (`models.PromptTokenizer`): prompts -> {"input_ids": (N, L),
    "input_ids_2": ..., ...}; it is pickled into the DataLoader workers."""

    def __init__(self, pairs: PreferencePairs, cfg: DataConfig,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.pairs, self.cfg, self.tokenize = pairs, cfg, tokenize

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        """Pair `key[0]` augmented with the draws of sample seed `key[1]` (`randomness.item_draws`).

        A plain int key `i` means `(i, i)` (handy outside `PairSampler`).
        """
        index, seed = key if isinstance(key, tuple) else (key, key)
        skipped, first_error = 0, None
        while True:
            caption, sources, label = self.pairs.images(index)
            try:
                images = [decode_pair_image(self.pairs, index, src) for src in sources]
                break
            except UserError as exc:
                # data.image_check lazy: nothing was decoded before training; the next pair takes this one's place
                # (the same seed, so the same draws), never a crash mid-run. Checked data cannot get here.
                first_error = first_error or exc
                if self.cfg.image_check != "lazy" or skipped + 1 >= len(self.pairs):
                    raise first_error from None
                index, skipped = (index + 1) % len(self.pairs), skipped + 1
        return build_item(caption, images, label, seed, self.cfg, self.tokenize, skipped)


def build_item(caption: str, images: list[Image.Image], label: float, seed: int, cfg: DataConfig,
               tokenize: Callable[[list[str]], dict[str, torch.Tensor]], bad_skipped: int = 0) -> dict:
    """One training item from decoded images (winner first): augmented with the draws of `seed`
    (`randomness.item_draws`: one flip and crop shared by the images, caption dropout) and tokenized. The one place
    items are made, whether pairs come by index (`PreferenceDataset`) or as a stream (`data.stream`)."""
    draws = item_draws(seed, cfg.random_flip, cfg.random_crop, cfg.proportion_empty_prompts)
    pixels, original_sizes, crop_top_lefts = [], [], []
    for img in images:
        original_sizes.append((img.height, img.width))
        array, top_left = prepare_image(img, cfg.resolution, draws.flip, draws.crop_fractions)
        pixels.append(array)  # (3, R, R)
        crop_top_lefts.append(top_left)
    prompt = "" if draws.empty_prompt else caption
    item = {
        "pixel_values": torch.from_numpy(np.stack(pixels)),  # (G, 3, R, R), winner first (G = 1: unpaired)
        "original_sizes": torch.tensor(original_sizes, dtype=torch.long),  # (G, 2) (h, w)
        "crop_top_lefts": torch.tensor(crop_top_lefts, dtype=torch.long),  # (G, 2) (top, left)
        "label": float(label),
        "prompt": prompt,
        "sample_seed": int(seed) & 0x7FFFFFFFFFFFFFFF,  # fits int64; the trainer draws the pair's noise from it
        "bad_pairs_skipped": bad_skipped,
    }
    for key, ids in tokenize([prompt]).items():
        item[key] = ids[0]  # (L,) per tokenizer
    return item


def decode_pair_image(pairs: PreferencePairs, index: int, src: ImageSource) -> Image.Image:
    """Decode one image of pair `index` to RGB; a broken file is a one-line `UserError` naming the row."""
    try:
        return load_rgb(src)
    except Exception as exc:  # noqa: BLE001 - only reachable with data.image_check lazy
        raise UserError(f"{pairs.where(index)}: image cannot be decoded ({short_reason(exc)})") from None


def prepare_image(img: Image.Image, size: int, flip: bool,
                  crop_fractions: tuple[Optional[float], Optional[float]]) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize (short side = size), crop (center, or at the given fractions), flip: (3, R, R) in [-1, 1] and
    the crop's (top, left) as SDXL sees it. The one place images become training pixels (uncached and cache)."""
    img = resize_short_side(img, size)
    top, left = crop_offsets(img.width, img.height, size, *crop_fractions)
    resized_width = img.width
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized_width - left - size  # SDXL conditions on the crop as seen after the flip
    return to_unit_range(img), (top, left)


def collate_pairs(examples: list[dict]) -> dict:
    """Stack items into a batch: every tensor field gets a leading batch dimension (pixel_values
    (B, 2, 3, R, R), input_ids (B, L), or the cache's latent parameters), label (B,), sample_seed (B,), prompts."""
    batch = {key: torch.stack([e[key] for e in examples]) for key, value in examples[0].items()
             if isinstance(value, torch.Tensor)}
    batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.float32)  # (B,)
    batch["sample_seed"] = torch.tensor([e["sample_seed"] for e in examples], dtype=torch.int64)  # (B,)
    if "bad_pairs_skipped" in examples[0]:  # data.image_check lazy: pairs passed over for a broken image
        batch["bad_pairs_skipped"] = torch.tensor([e["bad_pairs_skipped"] for e in examples], dtype=torch.int64)
    if "stream_epoch" in examples[0]:  # data.streaming: the epoch of each item's stream
        batch["stream_epoch"] = torch.tensor([e["stream_epoch"] for e in examples], dtype=torch.int64)
    if "prompt" in examples[0]:
        batch["prompt"] = [e["prompt"] for e in examples]
    return batch


_ALIGN = 16  # bytes: every tensor of a packed batch starts aligned, so its bytes view back as its dtype


def collate_packed(examples: list[dict]) -> dict:
    """`collate_pairs`, with every tensor of the batch packed into ONE byte buffer (a DataLoader worker runs it).

    A worker hands each tensor to the main process as its own shared-memory file descriptor, one socket round
    trip per tensor: ~0.7 ms each on this CPU, 7-10 ms per step for a cached flow-model batch of ten tensors,
    paid in the training loop's thread. One buffer is one round trip; `unpack_batch` views it back, no copy."""
    batch = collate_pairs(examples)
    layout, parts, offset = [], [], 0
    for key in [k for k, v in batch.items() if isinstance(v, torch.Tensor)]:
        t = batch.pop(key).contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
        pad = -raw.numel() % _ALIGN
        parts += [raw, torch.zeros(pad, dtype=torch.uint8)]
        layout.append((key, t.dtype, tuple(t.shape), offset, raw.numel()))
        offset += raw.numel() + pad
    batch["_packed"] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    batch["_layout"] = layout
    return batch


def unpack_batch(batch: dict) -> dict:
    """The batch `collate_packed` packed, its tensors as views of the one buffer (a plain batch is returned as is)."""
    if "_packed" not in batch:
        return batch
    buffer, layout = batch.pop("_packed"), batch.pop("_layout")
    for key, dtype, shape, offset, size in layout:
        batch[key] = buffer[offset:offset + size].view(dtype).view(shape)
    return batch


def locality_of(pairs: object, window_mb: float) -> Optional[Locality]:
    """The order's locality for pairs read in place from parquet (None: any order reads fast)."""
    rows = getattr(pairs, "rows", None)
    if not isinstance(rows, ParquetTable) or not isinstance(pairs, PreferencePairs):
        return None
    return Locality(rows.group_of(pairs.row_index), rows.group_bytes, int(window_mb * 2**20))


def keys_per_epoch(num_pairs: int, batch_size: int, num_processes: int) -> int:
    """Pairs one epoch visits over all processes: whole global batches (batch_size x processes); an
    incomplete last global batch is dropped. Training (`ShardedPairSampler`) and the precomputed
    reference (`reference.run_coverage`) both count with this."""
    global_batch = batch_size * num_processes
    return (num_pairs // global_batch) * global_batch


class PairSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Deterministic order: epoch e is a permutation of range(n) seeded by (seed, e).

    Yields (pair_index, sample_seed) with sample_seed derived from (seed, e, position), so an
    item's augmentation depends only on where it sits in the run. `set_epoch(e, start=k)`
    makes the next iteration skip the first k positions without touching their pairs (resume);
    `len()` is then the number of keys still to come, n - k.
    """

    def __init__(self, num_pairs: int, seed: int, shuffle: bool = True, locality: Optional[Locality] = None):
        if num_pairs < 1:
            raise ValueError("PairSampler needs at least one pair")
        self.num_pairs, self.seed, self.shuffle, self.locality = num_pairs, seed % 2**64, shuffle, locality
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch to iterate and the first position to yield."""
        if not 0 <= start <= self.num_pairs:
            raise ValueError(f"start must be in [0, {self.num_pairs}], got {start}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        """(n,) pair indices of `epoch` in the order they are visited."""
        if not self.shuffle:
            return np.arange(self.num_pairs)
        # The trailing 0 / 1 tags keep the permutation and the sample-seed streams independent.
        rng = np.random.default_rng([self.seed, epoch, 0])
        if self.locality is not None:  # pairs read in place from parquet row groups (data/parquet.py)
            return self.locality.order(rng, self.num_pairs)
        return rng.permutation(self.num_pairs)

    def sample_seed(self, epoch: int, position: int) -> int:
        """The augmentation seed of the item at `position` of `epoch`."""
        return int(np.random.SeedSequence([self.seed, epoch, 1, position]).generate_state(1, np.uint64)[0])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for position in range(self.start, self.num_pairs):
            yield int(order[position]), self.sample_seed(self.epoch, position)

    def __len__(self) -> int:
        return self.num_pairs - self.start
