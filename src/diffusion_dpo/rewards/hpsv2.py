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
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.rewards.common import RewardFn, hub_error, load_state_dict, resolve_source, to_rgb, torch_dtype

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCH = "ViT-H-14"
PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # open_clip's names


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

        return Path(hf_hub_download(HUB_REPO, filename))
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
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, precision=PRECISION[torch_type],
                                                                 device=device)
    try:
        model.load_state_dict(load_state_dict("hpsv2", file))
    except RuntimeError as err:  # wrong architecture for this checkpoint
        raise UserError(f"reward 'hpsv2': checkpoint '{file}' does not fit open_clip {arch}: "
                        f"{str(err).splitlines()[0]}") from err
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)

    @torch.no_grad()
    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([preprocess(im) for im in to_rgb(images)]).to(device, torch_type)  # (N, 3, 224, 224)
        tokens = tokenizer(list(prompts)).to(device)  # (N, 77)
        return hps_score(model.encode_image(pixels).float(), model.encode_text(tokens).float()).cpu()  # (N,)

    score.model = model
    return score
