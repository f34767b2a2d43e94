"""Validation sample grids: the reference and the policy on the same prompts and seeds, side by side.

Each (prompt, seed) is sampled twice from the same initial noise, once by the frozen reference
and once by the model being trained, so differences in the grid come from training alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch
from PIL import Image, ImageDraw
from torch import nn

from diffusion_dpo.models import Family, Reference

_LABEL_HEIGHT = 14
_MIN_CELL = 128  # pixels: cells narrower than this are enlarged (nearest neighbour)


@torch.no_grad()
def sample_images(components: Family, denoiser: nn.Module, prompts: Sequence[str], seeds: Sequence[int],
                  resolution: int, num_inference_steps: int, guidance_scale: float,
                  autocast: Optional[Callable[[], ContextManager]] = None) -> list[list[Image.Image]]:
    """Images [prompt][seed] from the family's pipeline around `denoiser`; seed s always gives the same initial
    noise."""
    pipe = components.build_pipeline(denoiser)
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.eval()
    rows = []
    try:
        for prompt in prompts:
            row = []
            for seed in seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU noise: identical on any device
                with autocast() if autocast is not None else contextlib.nullcontext():
                    # prompt by name: FLUX.2 [klein]'s first positional argument is a reference image
                    out = pipe(prompt=prompt, height=resolution, width=resolution,
                               num_inference_steps=num_inference_steps, generator=generator,
                               **components.guidance_kwargs(guidance_scale, 1), **components.sampling_kwargs())
                row.append(out.images[0])
            rows.append(row)
    finally:
        denoiser.train(was_training)
    return rows


def compose_grid(columns: dict[str, list[list[Image.Image]]], prompts: Sequence[str],
                 seeds: Sequence[int] | None = None) -> Image.Image:
    """A grid with one row per prompt and, for each seed, one column per model (e.g. reference | policy)."""
    names = list(columns)
    first = columns[names[0]]
    n_seeds = len(first[0])
    w, h = first[0][0].size
    scale = -(-_MIN_CELL // w) if w < _MIN_CELL else 1  # small (tiny-model) samples: enlarge so labels fit
    if scale > 1:
        columns = {k: [[im.resize((w * scale, h * scale), Image.NEAREST) for im in row] for row in rows]
                   for k, rows in columns.items()}
        w, h = w * scale, h * scale
    n_cols = n_seeds * len(names)
    grid = Image.new("RGB", (n_cols * w, _LABEL_HEIGHT + len(prompts) * (h + _LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for s in range(n_seeds):
        for m, name in enumerate(names):
            label = name if seeds is None else f"{name} s{seeds[s]}"
            draw.text(((s * len(names) + m) * w + 2, 1), label, fill="black")
    for r, prompt in enumerate(prompts):
        top = _LABEL_HEIGHT + r * (h + _LABEL_HEIGHT)
        draw.text((2, top + 1), prompt[: max(8, n_cols * w // 6)], fill="black")
        for s in range(n_seeds):
            for m, name in enumerate(names):
                grid.paste(columns[name][r][s], ((s * len(names) + m) * w, top + _LABEL_HEIGHT))
    return grid


def write_validation_grid(path: Path, components: Family, denoiser: nn.Module, reference: Reference | None,
                          prompts: Sequence[str], seeds: Sequence[int], resolution: int, num_inference_steps: int,
                          guidance_scale: float, autocast: Optional[Callable[[], ContextManager]] = None) -> Path:
    """Sample reference and policy on the same prompts/seeds and save the side-by-side PNG grid at `path`."""
    kwargs = dict(prompts=prompts, seeds=seeds, resolution=resolution, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, autocast=autocast)
    columns = {}
    if reference is not None:
        with reference.model(denoiser) as ref:
            columns["reference"] = sample_images(components, ref, **kwargs)
    columns["policy"] = sample_images(components, denoiser, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(columns, prompts, seeds).save(path)
    return path
