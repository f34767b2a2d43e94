"""`aesthetic`: the LAION improved aesthetic predictor, a linear-stack MLP on CLIP ViT-L/14 image embeddings.

    e     = visual_projection(pooled CLIP vision output)     # (N, 768) for ViT-L/14
    score = MLP(e / |e|)                                      # (N,), roughly 1..10 (AVA's rating scale)

The MLP is the one of github.com/christophschuhmann/improved-aesthetic-predictor
(`sac+logos+ava1-l14-linearMSE.pth`), in its own key layout:

    layers.0 Linear(768, 1024) · Dropout(0.2) · layers.2 Linear(1024, 128) · Dropout(0.2)
    · layers.4 Linear(128, 64) · Dropout(0.1) · layers.6 Linear(64, 16) · layers.7 Linear(16, 1)

with no activations in between (so at inference it is one affine map, kept as layers to read the
file as published). Layer sizes are taken from the file, so a smaller or retrained head of the
same layout also loads. The prompt is ignored: this reward judges the image alone.

Weights come from a local file (`path`): `.safetensors`, or `.pth`/`.pt` read with
`torch.load(weights_only=True)`; a directory holding `sac+logos+ava1-l14-linearMSE.{safetensors,pth}`
also works. The CLIP model giving the embeddings is the option `clip_model` (default
`openai/clip-vit-large-patch14`, the one the head was trained on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.rewards.clip_score import CLIP_MODEL, load_clip_embedder
from diffusion_dpo.evaluation.rewards.common import RewardFn, load_state_dict, resolve_source

WEIGHTS_STEM = "sac+logos+ava1-l14-linearMSE"
LINEAR_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")  # indices 1, 3, 5 are Dropouts
DROPOUTS = (0.2, 0.2, 0.1)  # only matter in training; kept so the module matches the published one


class AestheticMLP(nn.Module):
    """Linear(d0,d1) Drop Linear(d1,d2) Drop Linear(d2,d3) Drop Linear(d3,d4) Linear(d4,1): `dims` = (d0..d4, 1)."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(DROPOUTS[0]),
            nn.Linear(d[1], d[2]), nn.Dropout(DROPOUTS[1]),
            nn.Linear(d[2], d[3]), nn.Dropout(DROPOUTS[2]),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d0) unit-norm embeddings -> (N,) scores."""
        return self.layers(embeddings).squeeze(-1)


def _weights_file(path: str) -> Path:
    """The weights file itself, or the known file name inside a directory."""
    p = Path(resolve_source("aesthetic", path, "weights"))
    if p.is_dir():
        for suffix in (".safetensors", ".pth", ".pt"):
            if (p / (WEIGHTS_STEM + suffix)).is_file():
                return p / (WEIGHTS_STEM + suffix)
        raise UserError(f"reward 'aesthetic': directory '{path}' has no {WEIGHTS_STEM}.safetensors or .pth")
    return p


def load_mlp(file: str | Path) -> AestheticMLP:
    """Read the MLP from a LAION-layout state dict, with layer sizes inferred from the weights."""
    state = load_state_dict("aesthetic", file)
    missing = [f"{k}.{part}" for k in LINEAR_KEYS for part in ("weight", "bias") if f"{k}.{part}" not in state]
    if missing:
        raise UserError(f"reward 'aesthetic': weights file '{file}' is not the LAION aesthetic MLP layout "
                        f"(missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    weights = [state[f"{k}.weight"] for k in LINEAR_KEYS]  # each (out, in)
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    mlp = AestheticMLP(dims)
    try:
        mlp.load_state_dict(state)
    except RuntimeError as err:  # chained sizes disagree, or extra keys
        raise UserError(f"reward 'aesthetic': weights file '{file}' does not fit the MLP layout: "
                        f"{str(err).splitlines()[0]}") from err
    return mlp.float().eval().requires_grad_(False)


def load_aesthetic(path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                   clip_model: str = CLIP_MODEL) -> RewardFn:
    """`aesthetic` reward: MLP(e / |e|) with e the CLIP image embedding; `path` = the MLP weights file."""
    if path is None:
        raise UserError("reward 'aesthetic' needs path= the MLP weights file (sac+logos+ava1-l14-linearMSE.pth "
                        "from github.com/christophschuhmann/improved-aesthetic-predictor, or a .safetensors copy)")
    mlp = load_mlp(_weights_file(path))
    embedder = load_clip_embedder("aesthetic", clip_model, None, device, dtype, with_text=False)
    if embedder.dim != mlp.layers[0].in_features:
        raise UserError(f"reward 'aesthetic': weights '{path}' expect {mlp.layers[0].in_features}-d embeddings but "
                        f"clip_model '{clip_model}' gives {embedder.dim}-d")
    mlp.to(embedder.device)

    @torch.no_grad()
    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return mlp(embedder.images(images)).cpu()  # embedder.images is already L2-normalised float32; (N,)

    score.embedder, score.mlp = embedder, mlp
    return score
