"""Experiment trackers: which ones a run names, how they start, and validation grids sent to them as images.

`train.report_to` names any tracker accelerate supports (tensorboard, wandb, trackio, comet_ml, mlflow, clearml,
dvclive, swanlab, aim), several comma-separated, `all` (those installed) or `none`; metrics.jsonl is written
whatever it says. `train.tracker_project` is the project (TensorBoard: the folder under logs/), `train.run_name` the
run's name where the tracker has one (default: the output directory's name).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from diffusion_dpo.errors import UserError

# tracker name (accelerate's LoggerType) -> the package it needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "aim": "aim"}
# where a tracker takes a run name at init (accelerate passes init_kwargs[name] to it)
_RUN_NAME_KWARG = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name",
                   "aim": "experiment"}


def parse_report_to(value: str) -> Optional[list[str]]:
    """'tensorboard' | 'wandb,mlflow' | 'all' | 'none' -> accelerate's log_with (None: no tracker); an unknown name
    or a tracker whose package is not installed is a one-line UserError."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in (["none"], []):
        return None
    if names == ["all"]:
        return [n for n, package in TRACKER_PACKAGES.items() if importlib.util.find_spec(package) is not None]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise UserError(f"train.report_to: unknown tracker '{name}'; choose from {', '.join(TRACKER_PACKAGES)}, "
                            "several comma-separated, all or none")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise UserError(f"train.report_to={name} needs the {TRACKER_PACKAGES[name]} package: "
                            f"pip install {TRACKER_PACKAGES[name]} (or report_to tensorboard / none)")
    return names


def init_kwargs(trackers: list[str], run_name: str) -> dict[str, dict[str, Any]]:
    """Per-tracker init arguments carrying the run name, for the trackers that take one."""
    return {t: {_RUN_NAME_KWARG[t]: run_name} for t in trackers if t in _RUN_NAME_KWARG}


def log_image(trackers: list[Any], key: str, path: Path, step: int) -> None:
    """Send the PNG at `path` (a validation grid) to every started tracker that takes images, at `step`.

    TensorBoard's add_images wants a batch array and its layout; aim takes one image; the others (wandb, trackio,
    comet_ml, mlflow, clearml, dvclive, swanlab) take a list of PIL images or arrays."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    for tracker in trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({key: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "aim":
            tracker.log_images({key: image}, step=step)
        else:
            tracker.log_images({key: [image]}, step=step)
