"""Per-pair randomness: everything random about a pair in a training step comes from its sample seed.

A pair's sample seed is fixed by where it sits in the run (`PairSampler`: seed, epoch, position).
From it come two independent streams, each drawn in exactly one function here:

  * `item_draws`: the data-side choices (horizontal flip, crop fractions, empty-prompt swap), drawn
    with numpy where the item is built (a DataLoader worker, the cache reader);
  * `pair_noise`: the model-side draws (one timestep and one noise per pair, one standard-normal
    posterior sample per image), drawn with torch on the training device; the timestep's distribution is
    the model family's (`models.Family.draw_timestep`).

The uncached loader, the cached loader, the training step and the precomputed-reference pass all
call these same functions, so they cannot drift apart: a cached run and an uncached run, or a live and
a precomputed reference, see the same draws for the same pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (so nearby steps get unrelated streams)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def seed_global(seed: int, device: torch.device) -> None:
    """Seed the global generators that ops without a generator draw from (dropout, LoRA dropout): the CPU's and
    the training device's. (`torch.manual_seed` also queues a seed for every backend it finds uninitialised, CUDA,
    XPU and MTIA on a CPU machine, recording a Python stack trace for each: ~1 ms a call, once a step.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's, which accelerate set to this process's
    elif device.type != "cpu":
        torch.manual_seed(seed)


@dataclass(frozen=True)
class ItemDraws:
    """The data-side choices for one pair in one epoch (shared by both images of the pair)."""

    flip: bool  # horizontal flip (only when data.random_flip)
    crop_fractions: tuple[Optional[float], Optional[float]]  # (top, left) in [0, 1), or None = center
    empty_prompt: bool  # the caption is replaced by "" (data.proportion_empty_prompts)


def item_draws(seed: int, random_flip: bool, random_crop: bool, proportion_empty_prompts: float) -> ItemDraws:
    """Flip, crop and caption dropout of the item with this sample seed.

    Always draws the same four numbers, so switching one augmentation off leaves the others unchanged.
    """
    rng = np.random.default_rng(int(seed) % 2**64)
    u_flip, u_top, u_left, u_drop = rng.random(4)
    return ItemDraws(flip=bool(random_flip and u_flip < 0.5),
                     crop_fractions=(float(u_top), float(u_left)) if random_crop else (None, None),
                     empty_prompt=bool(u_drop < proportion_empty_prompts))


@dataclass
class PairNoise:
    """The model-side draws for B pairs, laid out for [winners; losers] (2B images), or for B single images
    (unpaired feedback: B)."""

    timesteps: Tensor  # (2B,): one timestep per pair (DDPM: int64 t; flow matching: float sigma), shared by its images
    noise: Tensor  # (2B, *latent_shape): one noise per pair, shared by its two images
    posterior: Tensor  # (2B, *posterior_shape): a standard-normal draw per image for the VAE posterior sample


DrawTimestep = Callable[[torch.Generator, tuple[int, ...], "torch.device | str"], Tensor]


def pair_noise(sample_seeds: Sequence[int], draw_timestep: DrawTimestep, latent_shape: tuple[int, ...],
               device: torch.device | str, images: int = 2,
               posterior_shape: Optional[tuple[int, ...]] = None) -> PairNoise:
    """Timesteps, noise and posterior draws of the pairs with these sample seeds.

    Each pair's draws come from a generator seeded by its own sample seed on `device`: first its timestep, by the
    model family's `draw_timestep(generator, latent_shape, device)`, then its noise (the denoiser's `latent_shape`)
    and its two posterior draws (the VAE's `posterior_shape`, default the same; FLUX.2's patchify makes them
    differ). Shapes of any rank. So they do not depend on how pairs are split over processes, micro-steps or (for
    the precomputed reference) batches. The generator lives on the training device: a precomputed reference must
    be drawn on the same device type as the run that uses it (the reference file records it). `images` is 2 for
    pairs, 1 for unpaired items (which take the first posterior draw: the same stream either way).
    """
    latent_shape, posterior_shape = tuple(latent_shape), tuple(posterior_shape or latent_shape)
    timesteps, noises, posteriors = [], [], []
    for seed in sample_seeds:
        g = torch.Generator(device=device).manual_seed(seed_for(int(seed), 1))
        timesteps.append(draw_timestep(g, latent_shape, device))
        if posterior_shape == latent_shape:  # one call: the stream every run and reference file has drawn
            draws = torch.randn((3, *latent_shape), generator=g, device=device)  # noise, posterior w, posterior l
            noises.append(draws[0])
            posteriors.append(draws[1:])
        else:
            noises.append(torch.randn(latent_shape, generator=g, device=device))
            posteriors.append(torch.randn((2, *posterior_shape), generator=g, device=device))
    noise, posterior = torch.stack(noises), torch.stack(posteriors)  # (B, *latent), (B, 2, *posterior)
    return PairNoise(timesteps=torch.cat(timesteps).repeat(images),
                     noise=noise.repeat(images, *([1] * len(latent_shape))),
                     posterior=torch.cat([posterior[:, k] for k in range(images)]))
