"""Pinned downloads: every hub source of a run resolved to one commit, once, and that commit used from then on.

A hub id's "main" moves. A run that read `main` at its start and again at a resume, or a generation run resumed a
week later, would mix two models without saying so. So each hub source is resolved to its commit sha at the start
of a run (online: the hub's answer; offline: the local cache's ref), the config's revision field is set to that
sha, and the pins are recorded in the run directory (`pins.json`: source, the revision asked for, the commit). A
resume reuses a recorded pin when the source and the revision asked for are unchanged, so it loads the very same
files; the model card names the commits.

Local paths are not pinned (they have no commit); a hub source that cannot be resolved (offline and not in the
cache) keeps the revision asked for, and its load fails later with the usual one-line error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from diffusion_dpo.errors import is_local_path

PINS_FILE = "pins.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(source: Optional[str]) -> bool:
    """Whether `source` names a hub repo (not an existing or clearly local path)."""
    return bool(source) and not Path(source).expanduser().exists() and not is_local_path(source)


def _cached_commit(repo_id: str, revision: str, repo_type: str) -> Optional[str]:
    """The commit the local hub cache holds for `revision` (its refs/<revision> file), or None."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit if _COMMIT.match(commit) else None
    return None


def resolve_commit(repo_id: str, revision: Optional[str] = None, repo_type: str = "model") -> Optional[str]:
    """The commit sha `revision` (default: main) of hub repo `repo_id` points at now, or None if it cannot be
    known (offline and not cached). A revision that is already a commit sha is returned as it is."""
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except Exception:  # noqa: BLE001 - no network, auth, not found: the cache may still know it
            pass
    return _cached_commit(repo_id, revision or "main", repo_type)


@dataclass(frozen=True)
class Pin:
    """One hub source of a run: the setting that names it, the repo, the revision asked for and its commit."""

    setting: str  # e.g. "model.pretrained"
    source: str  # the hub id
    requested: Optional[str]  # the revision the user asked for (None: main)
    commit: Optional[str]  # what it resolved to (None: could not be resolved)


# (setting naming the source, the revision field beside it, the hub repo type)
SOURCES = (("model.pretrained", "model.revision", "model"),
           ("model.vae", "model.vae_revision", "model"),
           ("model.reference", "model.reference_revision", "model"),
           ("data.path", "data.revision", "dataset"))


def _get(cfg: Any, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _set(cfg: Any, dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    setattr(getattr(cfg, section), key, value)


def read_pins(run_dir: Path) -> dict[str, Pin]:
    """The pins recorded in `run_dir` ({} when none or unreadable: they are resolved again)."""
    try:
        rows = json.loads((run_dir / PINS_FILE).read_text())
        return {row["setting"]: Pin(**row) for row in rows}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def pin(setting: str, source: str, requested: Optional[str], repo_type: str = "model",
        previous: Optional[Pin] = None) -> Pin:
    """Hub `source` at `requested` pinned to a commit: `previous` when it pinned the same source at the same requested
    revision to a commit (a resume reads what it began with), else what `requested` resolves to now."""
    if previous is not None and previous.source == source and previous.requested == requested and previous.commit:
        return previous
    return Pin(setting, source, requested, resolve_commit(source, requested, repo_type))


def pin_sources(cfg: Any, previous: Optional[dict[str, Pin]] = None) -> list[Pin]:
    """Resolve every hub source of `cfg` (model, VAE, reference, data set) to a commit, reusing `previous` pins
    whose source and requested revision are unchanged. Changes nothing; see `apply_pins`."""
    previous = previous or {}
    pins = []
    for setting, revision_field, repo_type in SOURCES:
        source = _get(cfg, setting)
        if not is_hub_id(source):
            continue
        pins.append(pin(setting, source, _get(cfg, revision_field), repo_type, previous.get(setting)))
    return pins


def apply_pins(cfg: Any, pins: list[Pin]) -> None:
    """Set each pinned source's revision field to its commit, so that every later download reads that commit."""
    fields = {setting: revision_field for setting, revision_field, _ in SOURCES}
    for pin in pins:
        if pin.commit:
            _set(cfg, fields[pin.setting], pin.commit)


def write_pins(run_dir: Path, pins: list[Pin]) -> None:
    """Record `pins` in `run_dir` (atomically)."""
    tmp = run_dir / f".{PINS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps([vars(p) for p in pins], indent=2) + "\n")
    os.replace(tmp, run_dir / PINS_FILE)


def pin_once(cfg: Any, run_dir: Optional[Path] = None) -> list[Pin]:
    """`pin_sources` decided by the main process (reusing the pins `run_dir` recorded, when given) and shared with
    every other, so that all load the same commit; then applied to `cfg`. Every process must call it."""
    from accelerate import PartialState

    from diffusion_dpo.processes import decide_once

    pins = decide_once(PartialState(), lambda: pin_sources(cfg, read_pins(run_dir) if run_dir is not None else None))
    apply_pins(cfg, pins)
    return pins
