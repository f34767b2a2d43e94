"""64-bit keys of rows and files, cheap to compute from metadata, for remembering what is known about them
(`image_checks`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_unit(path: str | Path) -> int:
    """A 64-bit identity of a file's current contents as far as cheap metadata tells: its resolved path, size and
    modification time (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return digest64(f"{p}\0{st.st_size}\0{st.st_mtime_ns}")


def digest64(text: str) -> int:
    """64 bits of blake2b of `text`."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def mix(units: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row keys: each (unit, row within it) pair mixed into 64 bits (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = units.astype(np.uint64) ^ (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
