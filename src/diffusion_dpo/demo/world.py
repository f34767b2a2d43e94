"""The demo's world: sklearn's 1,797 handwritten digits, prompts about them, and who may see what.

Real data that ships inside a package (`sklearn.datasets.load_digits`: 8x8 greyscale, ink 0..16)
is drawn dark-on-white, upsampled to `RESOLUTION` and replicated to RGB. A fixed seeded
permutation cuts the digits into three disjoint parts:

    base     60%   trains the base text-to-image pipeline (VAE, text encoder, UNet)
    scorers  20%   trains the hidden "crowd" preference model and the AI-feedback reward
    judge    20%   trains the evaluation judge, and nothing else

Prompts are phrasings of a digit ("a handwritten digit seven", "the numeral 7 in ink", ...).
The base model learns every phrasing (like a pretrained model that has read all kinds of text);
preference pairs use `PAIR_TEMPLATES` only, and evaluation uses the held-out `EVAL_TEMPLATES`
with seeds from a range that pair sampling never uses, so the measured win is on prompts and
noise that neither the labels nor the tuning saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

RESOLUTION = 16  # 8x8 digits hold no more detail; 16 px with a x2 VAE gives 8x8 latents (fast on a CPU)
SPLIT_SEED = 20231121  # the permutation that defines the three parts; part of every cache key
SPLIT_FRACTIONS = {"base": 0.6, "scorers": 0.2, "judge": 0.2}

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Each template names the digit once, as a word ("seven") or a numeral ("7"): 2 phrasings per template.
PAIR_TEMPLATES = (
    "a handwritten digit {}",
    "the number {} written by hand",
    "a scan of a handwritten {}",
    "digit {}",
    "a {} drawn with a pen",
    "a pencil sketch of the number {}",
    "a {} on a postal envelope",
    "a quickly scribbled {}",
)
EVAL_TEMPLATES = (
    "the numeral {} in ink",
    "a neat handwritten {}",
    "a child wrote the number {}",
    "a {} written on white paper",
    "an old scan of the digit {}",
    "a messy {} drawn by hand",
)
EVAL_SEED_START = 1_000_000  # evaluation seeds are EVAL_SEED_START + k; pair seeds stay far below


@dataclass(frozen=True)
class Digits:
    """The data set: images (N, 8, 8) as ink in [0, 1] and their labels (N,)."""

    ink: np.ndarray
    labels: np.ndarray


@lru_cache(maxsize=1)
def load_digits() -> Digits:
    """sklearn's handwritten digits (shipped inside scikit-learn: no download)."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    return Digits(ink=(data.images / 16.0).astype(np.float32), labels=data.target.astype(np.int64))


def splits(n: int = 1797, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint sorted index sets {"base", "scorers", "judge"} covering range(n), from one seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([round(n * f) for f in SPLIT_FRACTIONS.values()])[:-1]
    return {name: np.sort(part) for name, part in zip(SPLIT_FRACTIONS, np.split(order, cuts))}


def split(name: str) -> Digits:
    """One part of the data ("base", "scorers" or "judge")."""
    digits = load_digits()
    index = splits(len(digits.labels))[name]
    return Digits(ink=digits.ink[index], labels=digits.labels[index])


def to_image(ink: np.ndarray, resolution: int = RESOLUTION) -> Image.Image:
    """An (8, 8) ink array -> dark-on-white RGB image of resolution x resolution (bilinear upsampling)."""
    grey = Image.fromarray(np.round(255.0 * (1.0 - ink)).astype(np.uint8), mode="L")
    return grey.resize((resolution, resolution), Image.Resampling.BILINEAR).convert("RGB")


def to_ink(images: list[Image.Image]) -> np.ndarray:
    """Images (any size, any mode) -> (N, 64) ink features at 8x8, the scorers' input (box downsampling)."""
    arrays = [np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32) for im in images]
    return 1.0 - np.stack(arrays).reshape(len(images), 64) / 255.0


def phrasings(digit: int, templates: tuple[str, ...]) -> list[str]:
    """Every phrasing of `digit` under `templates`, word form then numeral form."""
    return [t.format(form) for t in templates for form in (NAMES[digit], str(digit))]


def all_captions(digit: int) -> list[str]:
    """Every caption the base model learns for `digit` (pair and evaluation templates)."""
    return phrasings(digit, PAIR_TEMPLATES + EVAL_TEMPLATES)


def pair_prompts(templates: int = len(PAIR_TEMPLATES)) -> list[dict]:
    """Prompts for preference pairs under the first `templates` pair templates: {"prompt", "digit"}, digit-major."""
    return [{"prompt": p, "digit": d} for d in range(10) for p in phrasings(d, PAIR_TEMPLATES[:templates])]


def eval_prompts() -> list[dict]:
    """Held-out evaluation prompts: {"prompt", "digit"}, digit-major."""
    return [{"prompt": p, "digit": d} for d in range(10) for p in phrasings(d, EVAL_TEMPLATES)]


_DIGIT_WORD = re.compile(r"\b(" + "|".join(NAMES) + r"|[0-9])\b")


def digit_of(prompt: str) -> int:
    """The digit a prompt asks for (its one digit word or numeral); ValueError if there is none or several."""
    found = {m if m.isdigit() else str(NAMES.index(m)) for m in _DIGIT_WORD.findall(prompt.lower())}
    if len(found) != 1:
        raise ValueError(f"prompt {prompt!r} names {'no digit' if not found else 'several digits'}")
    return int(found.pop())


def tokens() -> list[str]:
    """Every word the prompts use (the tokenizer's vocabulary beyond single characters)."""
    words = set(NAMES)
    for template in PAIR_TEMPLATES + EVAL_TEMPLATES:
        words.update(w for w in template.replace("{}", " ").split())
    return sorted(words)
