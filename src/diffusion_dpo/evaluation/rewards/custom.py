"""A user's own reward, named by import path: `package.module:function`.

The object at that path IS the reward function (not a factory):

    function(images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> sequence of N floats (or a tensor)

It is called once per batch of at most `batch_size` pairs and handles its own device. A reward
that must load a model once can be a module-level instance of a class with `__call__`
(`score = MyReward()`), or cache its model in the module. The path after the colon may be
dotted (`module:Class.method`).

Trust: the import path comes from the user's own config file, which is trusted like their code;
this is the only way configuration brings code in (DESIGN section 7). Data never names code.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from diffusion_dpo.errors import UserError

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(name: str) -> bool:
    """True for 'package.module:attribute' names (the colon tells them from built-in reward names)."""
    return ":" in name


def load_custom(name: str) -> Callable:
    """Import `module:attr` and return the callable found there."""
    if not IMPORT_PATH.match(name):
        raise UserError(f"reward '{name}': an own reward is written 'package.module:function'")
    module_name, attr_path = name.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # the module itself, or something it imports, is not installed
        raise UserError(f"reward '{name}': cannot import '{module_name}': {err}") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise UserError(f"reward '{name}': '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"reward '{name}': '{attr_path}' is not callable")
    return obj
