"""Parquet shards read where they lie: no second copy of the image bytes anywhere.

Pick-a-Pic v2 is ~335 GB of parquet. Converting it into an Arrow cache (what `datasets.Dataset.from_parquet` does)
writes all of it again, so local shards are read in place instead:

- the small columns (caption, labels) are read whole at the start: a few hundred MB for all of Pick-a-Pic, read in
  seconds, and all the checks before training need;
- image cells are read by row group, on demand, in each process and data-loader worker (a parquet column can only
  be decoded a row group at a time), and kept in a small per-process LRU (`data.shuffle_window_mb` x 2);
- so that the row groups a batch needs are few, the order of an epoch is local (`Locality`): the row groups are
  permuted, cut into windows of about `data.shuffle_window_mb` of image bytes, and the pairs of each window are
  permuted. Data whose images fit in one window (every test, the demo) keeps the plain permutation of all pairs, bit
  for bit. The order still depends only on (train.seed, epoch), never on processes or workers, so a resume on
  another layout continues at the same pair.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_COLUMNS = ("jpg_0", "jpg_1")


class ParquetTable:
    """Rows of parquet `files` (in order) for random access: `small` holds the columns read whole, image cells come
    from their row group through an LRU of `cache_bytes`."""

    def __init__(self, files: Sequence[Path], small_columns: Sequence[str],
                 image_columns: Sequence[str] = IMAGE_COLUMNS, cache_bytes: int = 2 << 30,
                 metadata: Optional[Sequence[pq.FileMetaData]] = None):
        """`metadata`: each file's footer when the caller has read it already (a footer read is a seek per shard)."""
        self.files = [str(f) for f in files]
        self.image_columns = tuple(image_columns)
        starts, group_file, group_index, group_bytes, total = [], [], [], [], 0
        for i, f in enumerate(self.files):
            meta = metadata[i] if metadata is not None else pq.ParquetFile(f).metadata
            names = meta.schema.to_arrow_schema().names
            wanted = [names.index(c) for c in self.image_columns]
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                starts.append(total)
                group_file.append(i)
                group_index.append(g)
                # column chunk sizes as stored: the image bytes (already compressed JPEG/PNG) dominate
                group_bytes.append(sum(group.column(c).total_uncompressed_size for c in _leaves(meta, wanted)))
                total += group.num_rows
        self.group_starts = np.array(starts, np.int64)
        self.group_file, self.group_index = np.array(group_file), np.array(group_index)
        self.group_bytes = np.array(group_bytes, np.int64)
        self.num_rows = total
        self.small: pa.Table = pa.concat_tables([pq.read_table(f, columns=list(small_columns)) for f in self.files],
                                                promote_options="permissive") if self.files else pa.table({})
        self.cache_bytes = cache_bytes
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._held = 0
        self._readers: dict[int, pq.ParquetFile] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get the table without its open files and cached groups (each opens its own)
        return {**self.__dict__, "_groups": OrderedDict(), "_held": 0, "_readers": {}}

    def __len__(self) -> int:
        return self.num_rows

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """The row group (global index) of each row."""
        return np.searchsorted(self.group_starts, np.asarray(rows, np.int64), side="right") - 1

    def _group(self, g: int) -> pa.Table:
        table = self._groups.get(g)
        if table is not None:
            self._groups.move_to_end(g)
            return table
        f = int(self.group_file[g])
        reader = self._readers.get(f)
        if reader is None:
            reader = self._readers[f] = pq.ParquetFile(self.files[f], memory_map=True)
        table = reader.read_row_group(int(self.group_index[g]), columns=list(self.image_columns))
        self._groups[g] = table
        self._held += table.nbytes
        while self._held > self.cache_bytes and len(self._groups) > 1:
            _, old = self._groups.popitem(last=False)
            self._held -= old.nbytes
        return table

    def image_cells(self, row: int) -> dict[str, Any]:
        """{image column: the stored cell} of `row` (bytes, or a datasets Image dict)."""
        g = int(self.group_of(np.array([row]))[0])
        table, offset = self._group(g), row - int(self.group_starts[g])
        return {c: table.column(c)[offset].as_py() for c in self.image_columns}

    def caption(self, row: int) -> Optional[str]:
        return self.small.column("caption")[row].as_py()

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        """A row as {caption, image cells} (as a datasets row reads), or for a list of rows {image column: cells}
        (as `images.TableImages` reads a batch)."""
        if isinstance(key, (list, tuple, np.ndarray)):
            cells = [self.image_cells(int(r)) for r in key]
            return {c: [x[c] for x in cells] for c in self.image_columns}
        return {"caption": self.caption(int(key)), **self.image_cells(int(key))}

    def select_columns(self, columns: Sequence[str]) -> "ParquetTable":
        """Itself: image cells are only ever read by row group (`images.TableImages` asks for the image columns)."""
        return self


def _leaves(meta: pq.FileMetaData, fields: Sequence[int]) -> list[int]:
    """The leaf column indices of top-level fields `fields` (a struct image cell has two: bytes and path)."""
    schema = meta.schema
    names = meta.schema.to_arrow_schema().names
    wanted = {names[i] for i in fields}
    return [i for i in range(len(schema)) if schema.column(i).path.split(".")[0] in wanted]


class Locality:
    """The order of an epoch when pairs live in row groups: groups permuted, cut into windows of about `window_bytes`
    of images, the pairs of each window permuted. One window (all the data fits): the plain permutation."""

    def __init__(self, pair_groups: np.ndarray, group_bytes: np.ndarray, window_bytes: int):
        self.pair_groups, self.group_bytes, self.window_bytes = pair_groups, group_bytes, window_bytes
        used = np.unique(pair_groups)
        self.single = int(group_bytes[used].sum()) <= window_bytes

    def order(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.single:
            return rng.permutation(n)
        groups = rng.permutation(len(self.group_bytes))
        by_group = np.argsort(self.pair_groups, kind="stable")  # pairs grouped, in pair order within a group
        bounds = np.searchsorted(self.pair_groups[by_group], np.arange(len(self.group_bytes) + 1))
        out, window, held = [], [], 0
        for g in groups:
            members = by_group[bounds[g]:bounds[g + 1]]
            if not len(members):
                continue
            if window and held + self.group_bytes[g] > self.window_bytes:
                out.append(rng.permutation(np.concatenate(window)))
                window, held = [], 0
            window.append(members)
            held += int(self.group_bytes[g])
        if window:
            out.append(rng.permutation(np.concatenate(window)))
        return np.concatenate(out)
