"""`hpsv2`: Human Preference Score v2 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

    img, txt = model.encode_image(preprocess(image)), model.encode_text(tokenize(prompt))   # (N, 1024)
    score    = 100 * cos(img_i, txt_i)

The HPSv2 code returns the bare cosine (about 0.2-0.3); its benchmark tables report it x100
(about 20-35), and so do we. Version: v2.1 by default (`HPS_v2.1_compressed.pt`, the authors'
recommended checkpoint); `version="v2.0"` selects `HPS_v2_compressed.pt`, the one in the paper.
Scores of the two versions are not comparable with each other.

This needs the optional `open_clip_torch` package (which itself needs torchvision); without it
loading fails with one line saying so. `path` is the HPS checkpoint file, or a directory holding
it; by default it comes from the hub repo `xswu/HPSv2` (from the cache when offline). The
checkpoint is a torch pickle, so it is read with `torch.load(weights_only=True)` (DESIGN section 7).
The architecture is built with `pretrained=None`: every weight comes from the HPS checkpoint.

Images are prepared as HPSv2 scores them (`hps_preprocess`): the long side resized to the model's input size and
the short side padded with black, not stock open_clip's centre crop, which would cut the edges off a non-square
image and score it wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.rewards.common import (RewardFn, hub_error, hub_revision, load_state_dict, resolve_source, to_rgb,
                                          torch_dtype)

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCH = "ViT-H-14"
PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # open_clip's names


# CLIP's normalisation (OpenAI's), which HPSv2 uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip fork with `light_augmentation`: `ResizeMaxSize`) -> (3, size, size).

    x = image / 255; scale the long side to `size` (bicubic, antialiased, the short side rounded); pad with black
    (0 before normalising) to size x size, the left/top pad the floor half; then (x - mean) / std with CLIP's
    statistics. (HPSv2 skips the pad when the long side already has the size; here every image comes out square.)"""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    h, w = x.shape[1:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _input_size(model: torch.nn.Module) -> int:
    """The vision tower's square input size (224 for ViT-H-14)."""
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def hps_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """HPS = 100 * cos(img_i, txt_i); features (N, D) -> (N,)."""
    return 100.0 * (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)


def _checkpoint(path: str | None, version: str) -> Path:
    """The HPS checkpoint: `path` (file or dir holding the version's file), else the hub copy."""
    filename = CHECKPOINTS[version]
    if path is not None:
        p = Path(resolve_source("hpsv2", path, "checkpoint"))
        if p.is_dir():
            p = p / filename
            if not p.is_file():
                raise UserError(f"reward 'hpsv2': directory '{path}' has no {filename} (version {version})")
        return p
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, filename, revision=hub_revision(HUB_REPO)))
    except Exception as err:  # offline and not cached, or no network
        raise hub_error("hpsv2", f"{HUB_REPO}/{filename}", err) from err


def load_hpsv2(path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
               version: str = "v2.1", arch: str = ARCH) -> RewardFn:
    """`hpsv2` reward: 100 * cos(image, prompt) with open_clip `arch` + the HPS `version` checkpoint."""
    try:
        import open_clip
    except ImportError:
        raise UserError("hpsv2 needs open_clip_torch (pip install open_clip_torch)") from None
    if version not in CHECKPOINTS:
        raise UserError(f"reward 'hpsv2': version '{version}' is not one of {', '.join(CHECKPOINTS)}")
    file = _checkpoint(path, version)
    torch_type = torch_dtype("hpsv2", dtype)
    device = torch.device(device)
    # pretrained=None: no download; the HPS checkpoint holds every weight, text tower included
    # open_clip's own transform centre-crops; HPSv2 resizes the long side and pads (hps_preprocess)
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None, precision=PRECISION[torch_type],
                                                        device=device)
    try:
        model.load_state_dict(load_state_dict("hpsv2", file))
    except RuntimeError as err:  # wrong architecture for this checkpoint
        raise UserError(f"reward 'hpsv2': checkpoint '{file}' does not fit open_clip {arch}: "
                        f"{str(err).splitlines()[0]}") from err
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    size = _input_size(model)

    @torch.no_grad()
    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([hps_preprocess(im, size) for im in to_rgb(images)]).to(device, torch_type)  # (N, 3, S, S)
        tokens = tokenizer(list(prompts)).to(device)  # (N, 77)
        return hps_score(model.encode_image(pixels).float(), model.encode_text(tokens).float()).cpu()  # (N,)

    score.model = model
    return score
