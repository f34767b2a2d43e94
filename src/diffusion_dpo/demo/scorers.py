"""Who judges the demo's images: digit classifiers fit on their own part of the data.

    crowd   hidden "people": logistic regression on the scorers split; their utility for an image
            x drawn for digit d is  u(x, d) = log p(d | x) - LEGIBILITY * H(p(. | x))
            (prompt alignment, plus legibility: an image that reads as no digit in particular
            has a high entropy H). Pairs are labelled from u by Bradley-Terry with ties (pairs.py).
    ai      the AI-feedback reward: a small MLP on the same scorers split, r(x, d) = log p(d | x);
            another model of the same people, as a reward model is.
    judge   the evaluation judge: an MLP with other settings fit on the judge split only, which
            nothing else ever reads; j(x, d) = log p(d | x).
    dev     a development scorer for choosing settings without the judge: an MLP fit on the base split
            (the digits the base model learnt from), v(x, d) = log p(d | x). It labels nothing; unlike the
            crowd's utility it shares no split with the AI reward, so a model that games the AI reward's
            classifier does not fool it.

`crowd_reward`, `ai_reward`, `judge_reward` and `dev_reward` follow the reward contract `fn(images, prompts) -> N floats`, so
`relabel` and `compare` use them through the registry as `diffusion_dpo.demo.scorers:ai_reward`
and `diffusion_dpo.demo.scorers:judge_reward`. Each classifier is fit once per process (a second
at most) and is a fixed function of the world: same data, same seed, same model.
Images are read at 8x8 (box-downsampled ink), the digits' own resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion_dpo.demo import world

LEGIBILITY = 0.5  # weight of legibility against alignment in the crowd's utility
LOG_FLOOR = 1e-6  # log p is floored here: one hopeless image must not outweigh a prompt's other seeds

CROWD_REWARD = "diffusion_dpo.demo.scorers:crowd_reward"
AI_REWARD = "diffusion_dpo.demo.scorers:ai_reward"
JUDGE_REWARD = "diffusion_dpo.demo.scorers:judge_reward"
DEV_REWARD = "diffusion_dpo.demo.scorers:dev_reward"


@dataclass(frozen=True)
class Classifier:
    """A fitted digit classifier and the split it was fit on (kept for the isolation test)."""

    name: str
    split: str
    model: Any  # an sklearn classifier with predict_proba over classes 0..9
    train_index: np.ndarray  # the digits it saw (indices into world.load_digits())

    def proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """p(. | image) for each image: (N, 10)."""
        return self.model.predict_proba(world.to_ink(list(images)))

    def accuracy(self, split: str) -> float:
        """Accuracy on another part of the real digits (a sanity check for the report)."""
        data = world.split(split)
        return float((self.model.predict(data.ink.reshape(len(data.ink), 64)) == data.labels).mean())


def _fit(name: str, split: str, model: Any) -> Classifier:
    data = world.split(split)
    model.fit(data.ink.reshape(len(data.ink), 64), data.labels)
    index = world.splits()[split]
    return Classifier(name=name, split=split, model=model, train_index=index)


@lru_cache(maxsize=None)
def classifier(name: str) -> Classifier:
    """The fitted 'crowd', 'ai', 'judge' or 'dev' classifier (fit once per process, deterministic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    # Raw ink in [0, 1], no standardisation: the real digits' border pixels are all but constant, so scaling
    # by their spread turns a faint smudge in a generated image's border into a huge feature.
    if name == "crowd":
        return _fit(name, "scorers", LogisticRegression(C=1.0, max_iter=3000))
    if name == "ai":
        return _fit(name, "scorers", MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-1, max_iter=600, random_state=1))
    if name == "judge":
        return _fit(name, "judge", MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-1, max_iter=600,
                                                 random_state=2))
    if name == "dev":
        return _fit(name, "base", MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-1, max_iter=600, random_state=3))
    raise ValueError(f"unknown classifier {name!r} (crowd, ai, judge or dev)")


def _log_p(proba: np.ndarray, digits: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(proba[np.arange(len(digits)), digits], LOG_FLOOR))


def crowd_utility(images: Sequence[Image.Image], digits: Sequence[int]) -> np.ndarray:
    """The hidden people's utility u(x, d) = log p(d|x) - LEGIBILITY * entropy(p(.|x)), (N,)."""
    proba = classifier("crowd").proba(images)
    entropy = -(proba * np.log(np.maximum(proba, 1e-12))).sum(axis=1)
    return _log_p(proba, np.asarray(digits)) - LEGIBILITY * entropy


def _digits(prompts: Sequence[str]) -> np.ndarray:
    return np.array([world.digit_of(p) for p in prompts])


def crowd_reward(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """The crowd's utility as a reward (for the report: what the people who labelled the pairs would say)."""
    return crowd_utility(images, _digits(prompts)).tolist()


def ai_reward(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """AI-feedback reward: log p_ai(prompted digit | image)."""
    return _log_p(classifier("ai").proba(images), _digits(prompts)).tolist()


def dev_reward(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """Development scorer (base split): log p_dev(prompted digit | image)."""
    return _log_p(classifier("dev").proba(images), _digits(prompts)).tolist()


def judge_reward(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """Held-out judge: log p_judge(prompted digit | image)."""
    return _log_p(classifier("judge").proba(images), _digits(prompts)).tolist()
