"""`imagereward`: ImageReward (Xu et al. 2023), a BLIP-based reward model, as an optional extra.

    score = ImageReward(prompt_i, image_i)    # (N,), the model's standardised reward (mean 0, std 1 on its data)

Needs the `image-reward` package (`pip install image-reward`) for the model's code (its BLIP and MLP head). Its
weights are read here, not by the package: its own `load` unpickles the checkpoint without `weights_only`, which
would run any code a checkpoint carries (DESIGN section 7). We build the package's `ImageReward` module and fill it
through `common.load_state_dict` (safetensors, or `torch.load(weights_only=True)`).

`path`: None or "ImageReward-v1.0" (the authors' hub repo THUDM/ImageReward: ImageReward.pt and med_config.json),
a checkpoint file (med_config.json beside it, else the hub's), or a directory holding both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.rewards.common import RewardFn, hub_error, hub_revision, load_state_dict, resolve_source, to_rgb

DEFAULT = "ImageReward-v1.0"
HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"  # the BLIP text encoder's BERT config the model is built from


def _hub_file(filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, filename, revision=hub_revision(HUB_REPO)))
    except Exception as err:  # offline and not cached, or no network
        raise hub_error("imagereward", f"{HUB_REPO}/{filename}", err) from err


def checkpoint_files(path: str | None) -> tuple[Path, Path]:
    """(weights file, med_config.json) for `path` (see the module docstring)."""
    if path is None or path == DEFAULT:
        return _hub_file(CHECKPOINT), _hub_file(MED_CONFIG)
    p = Path(resolve_source("imagereward", path, "checkpoint"))
    if p.is_dir():
        weights = next((p / n for n in (CHECKPOINT, "ImageReward.safetensors") if (p / n).is_file()), None)
        if weights is None:
            raise UserError(f"reward 'imagereward': directory '{path}' has no {CHECKPOINT}")
        p = weights
    config = p.parent / MED_CONFIG
    return p, config if config.is_file() else _hub_file(MED_CONFIG)


def load_imagereward(path: str | None = None, device: str | torch.device = "cpu") -> RewardFn:
    """`imagereward` reward: the `image-reward` package's model, its weights read without unpickling code."""
    try:
        from ImageReward.ImageReward import ImageReward as ImageRewardModel
    except ImportError:
        raise UserError("imagereward needs the image-reward package (pip install image-reward)") from None
    weights, med_config = checkpoint_files(path)
    state = load_state_dict("imagereward", weights)  # refuses a pickle that would run code
    device = torch.device(device)
    model = ImageRewardModel(device=str(device), med_config=str(med_config))
    # strict=False as the package's own loader: the checkpoint lacks buffers the model rebuilds (position ids)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(model.state_dict()):
        raise UserError(f"reward 'imagereward': weights file '{weights}' does not fit the ImageReward model "
                        f"({len(unexpected)} unexpected keys, {len(missing)} missing)")
    model.to(device).eval()

    @torch.no_grad()
    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        # the package scores one prompt against a list of images; ours are pairs, so one call each
        return torch.tensor([float(model.score(p, im)) for im, p in zip(to_rgb(images), prompts)])  # (N,)

    return score
