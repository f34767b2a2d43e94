"""Cheap fingerprints of model folders and data files, so a cache refuses to serve other weights or data.

A full hash of a multi-GB checkpoint would cost a minute at every training start; instead each file
contributes its name, its size, and 16 evenly spaced 64 KiB blocks (whole files below 1 MiB: configs,
tokenizer vocabularies). Fine-tuned weights differ almost everywhere, so a changed checkpoint changes the
fingerprint; two files that agree on every sampled block but differ elsewhere would not be told apart.
Names are relative to each folder's role ("vae", "text_encoder", ...), so a moved or copied model keeps
its fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Optional

from diffusion_dpo.config import ModelConfig
from diffusion_dpo.errors import is_local_path

_BLOCK = 64 * 1024
_BLOCKS = 16
_WHOLE = 1024 * 1024


def fingerprint(folders: Mapping[str, Optional[Path]]) -> str:
    """A 16-hex-digit fingerprint of the files under each {role: folder} (None: the folder could not be
    found locally, e.g. a hub model not downloaded; the role then counts by name only)."""
    h = hashlib.sha256()
    for role in sorted(folders):
        root = folders[role]
        h.update(f"[{role}]\0".encode())
        if root is None:
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{size}\0".encode())
            with f.open("rb") as fh:
                if size <= _WHOLE:
                    h.update(fh.read())
                    continue
                for k in range(_BLOCKS):
                    fh.seek(k * (size - _BLOCK) // (_BLOCKS - 1))
                    h.update(fh.read(_BLOCK))
    return h.hexdigest()[:16]


def model_root(pretrained: str, revision: Optional[str] = None) -> Optional[Path]:
    """The local folder of a model: the path itself, or a hub id's downloaded snapshot (None if not present)."""
    path = Path(pretrained).expanduser()
    if path.exists() or is_local_path(pretrained):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache: fingerprint by name only
        return None


def component_fingerprint(cfg: ModelConfig, roles: tuple[str, ...]) -> str:
    """Fingerprint of the pipeline folders `roles` (e.g. "unet", "text_encoder"); "vae" follows `cfg.vae`."""
    root = model_root(cfg.pretrained, cfg.revision)
    folders: dict[str, Optional[Path]] = {}
    for role in roles:
        if role == "vae" and cfg.vae is not None:
            vae_root = model_root(cfg.vae, cfg.vae_revision)
            nested = vae_root / "vae" if vae_root is not None else None
            folders[role] = nested if nested is not None and (nested / "config.json").is_file() else vae_root
        else:
            folders[role] = root / role if root is not None and (root / role).exists() else None
    return fingerprint(folders)


def data_fingerprint(spec: str) -> Optional[str]:
    """Names and sizes of a local data file or folder (None for a hub data set): a replaced or grown data set
    is told apart without reading it."""
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                   and not any(s.startswith(".") for s in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()[:16]
