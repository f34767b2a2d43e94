"""Diffusion-DPO: Direct Preference Optimization for text-to-image diffusion models.

Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization".

The Python API (the command line is a thin layer over the same functions):

    import diffusion_dpo as dd

    cfg = dd.load_config("configs/tiny.yaml", {"model.pretrained": "tiny/sd", "output_dir": "runs/x"})
    final = dd.train(cfg, dataset=None, callback=lambda m: print(m["step"], m["loss"]))  # final/ directory
    dd.generate("tiny/sd", ["a red circle"], seeds=[0, 1], out_dir="gen/tuned", lora=None)
    report = dd.compare("gen/tuned", "gen/base", ["clip"], "cmp")  # win rates with intervals, effect sizes

    from diffusion_dpo.iterate import iterate  # on-policy rounds (the module's name, so not a package attribute)
    rounds = iterate(dd.load_config("online.yaml", iterate=True))  # report.json's contents

Names are imported on first use (PEP 562), so `import diffusion_dpo` and the CLI stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (one home each)
_EXPORTS = {
    "Config": "diffusion_dpo.config", "load_config": "diffusion_dpo.config", "check_config": "diffusion_dpo.config",
    "Trainer": "diffusion_dpo.training.trainer", "train": "diffusion_dpo.training.trainer",
    "generate": "diffusion_dpo.evaluation.generate",
    "compare": "diffusion_dpo.evaluation.compare", "score_run": "diffusion_dpo.evaluation.compare",
    "relabel": "diffusion_dpo.evaluation.relabel",
    "load_reward": "diffusion_dpo.evaluation.rewards",
    "LOSSES": "diffusion_dpo.training.losses", "LossSpec": "diffusion_dpo.training.losses", "LossOutput": "diffusion_dpo.training.losses",
    "get_loss": "diffusion_dpo.training.losses",
    "UserError": "diffusion_dpo.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name loads on first access
    from diffusion_dpo.config import Config, check_config, load_config
    from diffusion_dpo.errors import UserError
    from diffusion_dpo.evaluation.compare import compare, score_run
    from diffusion_dpo.evaluation.generate import generate
    from diffusion_dpo.training.losses import LOSSES, LossOutput, LossSpec, get_loss
    from diffusion_dpo.evaluation.relabel import relabel
    from diffusion_dpo.evaluation.rewards import load_reward
    from diffusion_dpo.training.trainer import Trainer, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusion_dpo' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
