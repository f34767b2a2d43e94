"""`imagereward`: ImageReward (Xu et al. 2023), a BLIP-based reward model, as an optional extra.

    score = ImageReward(prompt_i, image_i)    # (N,), the model's standardised reward (mean 0, std 1 on its data)

Needs the `image-reward` package (`pip install image-reward`), whose own loader downloads and
reads the checkpoint: `path` is a model name it knows (default "ImageReward-v1.0") or a local
checkpoint file. That loader unpickles its checkpoint without `weights_only`, so only point it at
files you trust (DESIGN section 7); this module adds no code path of its own that does so.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.rewards.common import RewardFn, resolve_source, to_rgb

DEFAULT = "ImageReward-v1.0"


def load_imagereward(path: str | None = None, device: str | torch.device = "cpu") -> RewardFn:
    """`imagereward` reward through the `image-reward` package's `ImageReward.load(path)`."""
    try:
        import ImageReward as image_reward
    except ImportError:
        raise UserError("imagereward needs the image-reward package (pip install image-reward)") from None
    source = resolve_source("imagereward", path or DEFAULT, "checkpoint")
    model = image_reward.load(source, device=str(torch.device(device)))
    model.eval()

    @torch.no_grad()
    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        # the package scores one prompt against a list of images; ours are pairs, so one call each
        return torch.tensor([float(model.score(p, im)) for im, p in zip(to_rgb(images), prompts)])  # (N,)

    return score
