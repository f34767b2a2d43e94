"""Reward models behind one contract: `reward(images, prompts) -> scores`, and a registry by name.

    reward = load_reward("pickscore", path=None, device="cuda", batch_size=16)
    scores = reward(images, prompts)     # N PIL images, N prompts -> float32 tensor (N,) on the CPU

Image i is scored against prompt i. Scores are computed in batches of `batch_size` under
`torch.no_grad()` on the configured device, and always come back as float32 on the CPU so that
callers can mix rewards and devices freely.

Built-in names (one module each; formulas in their docstrings):

    pickscore    exp(logit_scale) * cos(image, prompt)      PickScore_v1 (CLIP-H)          clip_score.py
    clip         100 * max(cos(image, prompt), 0)           any CLIP, default openai L/14  clip_score.py
    aesthetic    MLP(unit CLIP L/14 image embedding)         LAION improved predictor       aesthetic.py
    hpsv2        100 * cos(image, prompt)                    HPS v2.1 (open_clip ViT-H-14)  hpsv2.py
    imagereward  ImageReward(prompt, image)                  needs `image-reward`           imagereward.py

and `package.module:function` (an import path, told apart by its colon) for a user's own reward
function `fn(images, prompts) -> N floats` (see custom.py). `path` is a local directory or file,
or a hub id when online (or cached); other keyword options go to the reward's loader (e.g.
`dtype="float16"`, `processor=...` for clip/pickscore, `clip_model=...` for aesthetic,
`version="v2.0"` for hpsv2).

Weighted sums are written `pickscore=1.0,aesthetic=0.5` (`=` and `,` never occur in reward names
or import paths, unlike `:`); see `parse_weighted` and `weighted_score`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluation.rewards.aesthetic import load_aesthetic
from diffusion_dpo.evaluation.rewards.clip_score import load_clip, load_pickscore
from diffusion_dpo.evaluation.rewards.common import RewardFn, take_read
from diffusion_dpo.evaluation.rewards.custom import is_import_path, load_custom
from diffusion_dpo.evaluation.rewards.hpsv2 import load_hpsv2
from diffusion_dpo.evaluation.rewards.imagereward import load_imagereward

__all__ = ["REWARDS", "Reward", "RewardFn", "load_reward", "parse_weighted", "weighted_score"]

# name -> factory(path=None, device="cpu", **options) -> RewardFn scoring one batch
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "pickscore": load_pickscore,
    "hpsv2": load_hpsv2,
    "clip": load_clip,
    "aesthetic": load_aesthetic,
    "imagereward": load_imagereward,
}


@dataclass
class Reward:
    """A loaded reward: `reward(images, prompts) -> float32 (N,)` on the CPU, in batches of `batch_size`."""

    name: str
    score_batch: RewardFn  # scores one batch of at most batch_size pairs
    batch_size: int = 16
    commits: dict[str, str] = field(default_factory=dict)  # hub id -> the commit its weights were read at

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """scores[i] = reward(images[i], prompts[i]); shape (N,)."""
        if len(images) != len(prompts):
            raise ValueError(f"reward '{self.name}': {len(images)} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch_images = list(images[start:start + self.batch_size])
                batch_prompts = [str(p) for p in prompts[start:start + self.batch_size]]
                out.append(self._checked(self.score_batch(batch_images, batch_prompts), len(batch_images)))
        return torch.cat(out) if out else torch.zeros(0)

    def _checked(self, scores, n: int) -> torch.Tensor:
        # a user's own reward may return a list, a numpy array or a tensor on any device
        try:
            scores = torch.as_tensor(scores).detach().to("cpu", torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"reward '{self.name}' returned something that is not a list of numbers: {err}") from err
        if scores.numel() != n:
            raise UserError(f"reward '{self.name}' returned {scores.numel()} scores for {n} images")
        return scores


def _options_of(factory: Callable) -> list[str]:
    return [p for p in inspect.signature(factory).parameters if p not in ("path", "device")]


def load_reward(name: str, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 16,
                **options) -> Reward:
    """Load the reward `name` (a registry name or 'package.module:function') from `path` (default: its hub id)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"reward '{name}': batch_size must be a positive integer, got {batch_size!r}")
    if is_import_path(name):
        if path is not None or options:
            given = ", ".join((["path"] if path is not None else []) + list(options))
            raise UserError(f"reward '{name}': an own reward function takes no {given} (it loads what it needs itself)")
        return Reward(name, load_custom(name), batch_size)
    if name not in REWARDS:
        raise UserError(f"unknown reward '{name}'; choose one of {', '.join(sorted(REWARDS))}, "
                        f"or 'package.module:function' for your own")
    factory = REWARDS[name]
    unknown = sorted(set(options) - set(_options_of(factory)))
    if unknown:
        allowed = ", ".join(_options_of(factory)) or "none"
        raise UserError(f"reward '{name}': unknown option {', '.join(unknown)} (options: {allowed})")
    take_read()  # what an earlier load read is not this reward's
    score_batch = factory(path=path, device=device, **options)
    return Reward(name, score_batch, batch_size, take_read())


def parse_weighted(spec: str) -> list[tuple[str, float]]:
    """'pickscore=1.0,aesthetic=0.5' -> [('pickscore', 1.0), ('aesthetic', 0.5)]; a bare name weighs 1.0."""
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, sep, weight = (s.strip() for s in part.partition("="))
        if not name:
            raise UserError(f"reward spec '{spec}': empty reward name (write e.g. 'pickscore=1.0,aesthetic=0.5')")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise UserError(f"reward spec '{spec}': weight '{weight}' of '{name}' is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"reward spec '{spec}': weight of '{name}' must be finite")
        if name in (n for n, _ in terms):
            raise UserError(f"reward spec '{spec}': '{name}' appears twice")
        terms.append((name, value))
    return terms


def weighted_score(rewards: Sequence[RewardFn], weights: Sequence[float], images: Sequence[Image.Image],
                   prompts: Sequence[str]) -> torch.Tensor:
    """score = sum_k w_k * r_k(images, prompts); float32 (N,)."""
    if len(rewards) != len(weights):
        raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
    total = torch.zeros(len(images))
    for reward, weight in zip(rewards, weights):
        total += float(weight) * torch.as_tensor(reward(images, prompts), dtype=torch.float32).cpu()  # (N,)
    return total
