"""What every reward module shares: the batch contract, where weights come from, how they are read.

A reward model is named by a local path or a hub id. A string that looks like a path (absolute,
relative with ./ or ../, ~, a weights-file suffix, or more than one '/') and does not exist is a
user mistake reported at once; anything else is tried as a hub id, which only works offline when
it is already in the Hugging Face cache.

Weights are untrusted data (DESIGN section 7): safetensors when the format allows it, otherwise
`torch.load(weights_only=True)`, which refuses to run pickled code.

A hub id is read at one commit per process (`hub_revision`: resolved once, as `pinning` does for models), so a
comparison or a relabelling never mixes two versions of a reward; runs that resume record the commits and preset
them (`preset_pins`), and the score caches are keyed by them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from diffusion_dpo.errors import UserError

# images (N PIL images) and prompts (N strings) -> float32 scores of shape (N,), on the CPU
RewardFn = Callable[[Sequence[Image.Image], Sequence[str]], torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def looks_local(source: str) -> bool:
    """True when `source` is meant as a filesystem path rather than a hub id like 'org/name'."""
    path = Path(source).expanduser()
    return (path.exists() or source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source
            or source.endswith(WEIGHT_SUFFIXES) or source.count("/") > 1)


def resolve_source(reward: str, source: str, what: str = "path") -> str:
    """An existing local path (made absolute) or a hub id; a local-looking path that is missing -> UserError."""
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"reward '{reward}': {what} '{source}' does not exist")
        return str(path.resolve())
    return source


_PINNED: dict[str, Optional[str]] = {}  # hub id -> the commit this process reads it at (None: not resolvable)
_READ: list[str] = []  # hub ids read since the last `take_read` (the reward being loaded)


def hub_revision(source: str) -> Optional[str]:
    """The commit hub repo `source` is read at in this process: resolved on first use (or preset), then the same
    for every later load. None when it cannot be resolved (offline and not cached): the load then reads main."""
    from diffusion_dpo.pinning import resolve_commit

    if source not in _PINNED:
        _PINNED[source] = resolve_commit(source)
    _READ.append(source)
    return _PINNED[source]


def preset_pins(pins: dict[str, str]) -> None:
    """Read these hub ids at these commits (a resumed run's record) instead of resolving them again."""
    _PINNED.update({k: v for k, v in pins.items() if v})


def take_read() -> dict[str, str]:
    """{hub id: commit} of the pinned hub ids read since the last call (and forget them)."""
    read = {s: _PINNED[s] for s in dict.fromkeys(_READ) if _PINNED.get(s)}
    _READ.clear()
    return read


def hub_error(reward: str, source: str, err: Exception) -> UserError:
    """The one-line error for a model that could not be loaded from a local dir or the hub (cache)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).exists():
        return UserError(f"reward '{reward}': cannot load '{source}': {first}")
    return UserError(f"reward '{reward}': cannot load '{source}': not a local path and not available from the "
                     f"Hugging Face hub or its cache (offline?): {first}")


def torch_dtype(reward: str, name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"reward '{reward}': dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_state_dict(reward: str, file: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from .safetensors, or from a torch pickle with weights_only=True (never runs code).

    A checkpoint that nests its weights under 'state_dict' (as the HPS and Lightning ones do) is
    unwrapped, and a DataParallel 'module.' prefix is dropped."""
    file = Path(file)
    if not file.is_file():
        raise UserError(f"reward '{reward}': weights file '{file}' does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file or one that needs arbitrary code to unpickle
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"reward '{reward}': cannot read weights file '{file}': {first}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"reward '{reward}': weights file '{file}' does not hold a dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Every reward model was trained on 3-channel RGB; grey, palette and RGBA images are converted."""
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]
