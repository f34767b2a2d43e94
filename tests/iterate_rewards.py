"""Rewards for the iterate tests, importable as `iterate_rewards:<name>` (the tests directory is on sys.path)."""

import numpy as np


def brightness(images, prompts):
    """Mean pixel value in [0, 1]: prefers brighter images."""
    return [float(np.asarray(im.convert("L"), np.float64).mean() / 255.0) for im in images]


def redness(images, prompts):
    """Mean red minus mean blue in [-1, 1]: a second, different reward (the held-out one)."""
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB"), np.float64) / 255.0
        out.append(float(a[..., 0].mean() - a[..., 2].mean()))
    return out
