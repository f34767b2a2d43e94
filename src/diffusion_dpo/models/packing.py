"""Latents as tokens, 2x2 patches: FLUX.1's packing, which Qwen-Image's pipeline shares (FLUX.2 packs one token per
latent pixel of its already patchified latents: models/flux2.py); and what such a family's pipeline expects of the
initial noise (`PackedLatents`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pack(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch one token, channels-major within it (FluxPipeline's)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, channels: int, height: int, width: int) -> Tensor:
    """The inverse of `pack`: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n = tokens.shape[0]
    x = tokens.view(n, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, height, width)


def image_ids(rows: int, cols: int, device: torch.device | str) -> Tensor:
    """(rows * cols, 3) position ids of the packed tokens: (0, row, col)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


class PackedLatents:
    """A family mixin (before its Family base): latents packed 2x2 into tokens, as FluxPipeline and QwenImagePipeline
    take them: sides a multiple of 2 latents, the noise handed over packed, the pipeline's default size."""

    def latent_multiple(self) -> int:
        return 2  # 2x2 packing

    @classmethod
    def latent_channels(cls, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 4

    @classmethod
    def native_size(cls, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    @classmethod
    def size_multiple(cls, pipe: Any) -> int:
        return 2 * pipe.vae_scale_factor

    @classmethod
    def pipeline_latents(cls, noise: Tensor) -> Tensor:
        return pack(noise)  # the pipelines take `latents=` already packed
