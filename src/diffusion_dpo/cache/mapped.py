"""A safetensors shard memory-mapped once, its rows read as slices of the map.

A training item reads one row of ~6 tensors from two or three shards, a few KiB each. Through
`safetensors.safe_open(...).get_slice(key)[a:b]` each read pays Python and Rust bookkeeping that a slice of a
tensor view over one `torch.UntypedStorage.from_file` map does not (a tiny cache's pair: 0.78 ms against 0.50,
`benchmarks/loop_phases.py`). The file format is safetensors' documented layout (an 8-byte little-endian
header length, a JSON header of dtype, shape and byte offsets, then the data); the files are written by
`safetensors.torch.save_file` (`cache.chunks`). The map is private and lazy: only the pages a read touches are
loaded, and nothing is written back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

# safetensors' dtype names (the format's specification) for the dtypes a cache stores
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class MappedFile:
    """The tensors of one safetensors file as lazy views of a private memory map."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
        self.metadata: dict = header.pop("__metadata__", None) or {}
        size = path.stat().st_size
        data = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        whole = torch.empty(0, dtype=torch.uint8).set_(data, 0, (size,))
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...], Tensor]] = {}
        for key, info in header.items():
            start, end = info["data_offsets"]
            self._specs[key] = (DTYPES[info["dtype"]], tuple(info["shape"]), whole[8 + length + start:8 + length + end])

    def keys(self) -> list[str]:
        return list(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._specs[key][1]

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of tensor `key` (along its first axis), copied out of the map."""
        dtype, shape, raw = self._specs[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        # a copy of the bytes first: a view of the map at an unaligned offset cannot be reinterpreted in place
        return raw[start * row_bytes:stop * row_bytes].clone().view(dtype).view(stop - start, *shape[1:])

    def row(self, key: str, index: int, sub: int | None = None) -> Tensor:
        """Row `index` of tensor `key`; with `sub`, only entry `sub` of that row's second axis (one contiguous run
        of bytes)."""
        if sub is None:
            return self.rows(key, index, index + 1)[0]
        dtype, shape, raw = self._specs[key]
        inner = math.prod(shape[2:]) * dtype.itemsize
        at = (index * shape[1] + sub) * inner
        return raw[at:at + inner].clone().view(dtype).view(shape[2:])

    def tensor(self, key: str) -> Tensor:
        """The whole tensor `key`, copied out of the map."""
        dtype, shape, raw = self._specs[key]
        return raw.clone().view(dtype).view(shape)
