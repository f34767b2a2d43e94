"""The base-model cache: built once per recipe, kept in the user's cache directory, written atomically.

    $XDG_CACHE_HOME/diffusion-dpo/demo/base-<recipe hash>/     (default ~/.cache/...)

A build goes to a temporary sibling directory and is renamed into place only when complete, so an
interrupted build never leaves a directory that a later run would take for a finished one. The
hash covers the recipe, the data split and the library versions (base.recipe_key).

The package ships the bases of the documented demos (docs/demo.md), built by this same recipe code (`SHIPPED`/base-<key
without versions>, a few MB each): a run takes its own cache entry first, then the shipped base, and builds only
when neither exists or with `--rebuild`. So a fresh clone starts from the very weights the documented numbers were
measured on (a base trained on another CPU differs at float precision, and the demo's numbers with it), and skips
the build. After a recipe change, `diffusion-dpo demo --rebuild [--family F]` builds the new base into the
cache; copying that entry to `SHIPPED/base-<recipe_key(recipe, versions=False)>` ships it (a test checks that
each full recipe has its shipped base).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from diffusion_dpo.errors import UserError


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/diffusion-dpo/demo, or ~/.cache/diffusion-dpo/demo."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "diffusion-dpo" / "demo"


SHIPPED = Path(__file__).parent / "bases"


def shipped_base(recipe: Any) -> Optional[Path]:
    """The base shipped with the package for `recipe`, or None."""
    from diffusion_dpo.demo.base import recipe_key

    path = SHIPPED / f"base-{recipe_key(recipe, versions=False)}"
    return path if (path / "model_index.json").is_file() else None


def cached_base(recipe: Any, cache_dir: Optional[Path] = None, rebuild: bool = False,
                progress: Optional[Callable[[int], None]] = None) -> tuple[Path, bool]:
    """(the base pipeline directory, whether it was built now) for `recipe` (a recipe of demo/base.py or
    demo/base_sd3.py: `key()`, `build(out_dir, progress)`): the cache entry, else the shipped base, else a build."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"base-{recipe.key()}"
    if final.is_dir() and (final / "model_index.json").is_file() and not rebuild:
        return final, False
    shipped = None if rebuild else shipped_base(recipe)
    if shipped is not None:
        return shipped, False
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    except OSError as exc:
        raise UserError(f"cache directory '{cache_dir}' is not writable ({exc.strerror or exc}); "
                        "pass another --cache-dir") from None
    try:
        recipe.build(tmp, progress)
        if final.exists():  # --rebuild: the old build goes only once the new one is complete
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, True
