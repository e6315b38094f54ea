"""The rows a generated stream draws from: an index stored once beside its view (or store), memory-mapped.

The index lists the rows by *block*, one Parquet row group of one shard (`shards.ROW_GROUP_ROWS` rows; a shard
written before row groups is one block), the unit a training rank reads (`raylab.data.mix`). Per block: its file,
row group, first stored row and stored rows, and where its rows start in the per-row arrays; per row: its row in
the shard and its training label (the view's, which may be pseudo-labels). A whole store's index has no per-row
arrays: every stored row of every block, labelled by the shard's own `label` column.

On disk, a directory (`<view>/index/`, or `<store>/index/<key>/` for a whole store)::

    index.json   format, store, shard names, rows, and what it was built from (checked on open)
    blocks.npy   one BLOCK record per block with rows (blocks the view keeps nothing of are left out)
    row.npy      int32 per row, grouped by block (views only)
    label.npy    int16 per row (views only)

It is built in O(N), vectorised over chunks of rows (never per shard over all rows: that was minutes at 20M rows
in 2,000 shards), in bounded memory, in a temp directory renamed into place. `open_index` maps the arrays
(np.load mmap_mode="r"), so a process pages in only the blocks it reads, and an index pickles as its path: the
Train loop config and every read task carry the path, never the rows (10 bytes a row: 500 MB at 50M).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from numpy.lib.format import open_memmap

from raylab.data.shard_format import ShardError
from raylab.io import atomic_write_json, current_umask, exclusive

INDEX_FORMAT = "raylab-row-index/1"
INDEX_META = "index.json"
BLOCK = np.dtype([("file", "<i4"), ("group", "<i4"), ("first", "<i8"), ("stored", "<i4"), ("start", "<i8")])
CHUNK_ROWS = 1 << 22  # rows per vectorised step of a build: 4M rows, ~100 MB of temporaries


@dataclass(frozen=True, eq=False)
class RowIndex:
    """Rows by block: `blocks` (BLOCK records: file index, row group, its first stored row, rows stored, and its
    first row in `row`/`label`), `row` (row within the shard) and `label` per row; both None for a whole store
    (every stored row, the shard's labels). `path`: the directory it was opened from, what it pickles as."""
    files: tuple[str, ...]
    blocks: np.ndarray
    rows: int
    row: np.ndarray | None = None
    label: np.ndarray | None = None
    path: str | None = None

    def __reduce__(self):
        if self.path is not None:
            return open_index, (self.path,)
        return RowIndex, (self.files, self.blocks, self.rows, self.row, self.label)

    def __len__(self) -> int:
        return self.rows

    @property
    def sizes(self) -> np.ndarray:
        """Rows of each block."""
        return np.diff(np.append(self.blocks["start"], self.rows))

    def block_sizes(self, blocks: np.ndarray) -> np.ndarray:
        """Rows of the given blocks alone (O(len(blocks)), not O(all blocks))."""
        starts = self.blocks["start"]
        after = np.where(blocks + 1 < len(starts), starts[np.minimum(blocks + 1, len(starts) - 1)], self.rows)
        return after - starts[blocks]

    def file_rows(self, rows: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Row within its shard of each of `rows` (indices of this index's rows; `block`: the block of each)."""
        if self.row is not None:
            return np.asarray(self.row[rows], np.int64)
        return self.blocks["first"][block] + (rows - self.blocks["start"][block])

    def labels(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self.label is None else np.asarray(self.label[rows], np.int16)

    def subset(self, blocks: Sequence[int]) -> "RowIndex":
        """An in-memory index of `blocks` alone, renumbered 0..len-1 in the order given (what a read task of an
        index with no file behind it carries: O(its blocks) rows)."""
        blocks = np.asarray(blocks, np.int64)
        picked, sizes = self.blocks[blocks].copy(), self.block_sizes(blocks)
        rows = np.repeat(picked["start"] - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
        picked["start"] = np.cumsum(sizes) - sizes
        return RowIndex(self.files, picked, int(sizes.sum()), None if self.row is None else np.asarray(self.row[rows]),
                        None if self.label is None else np.asarray(self.label[rows]))

    @classmethod
    def from_positions(cls, files: Sequence[str], shard: np.ndarray, row: np.ndarray, label: np.ndarray,
                       stored: Sequence[int] | None = None) -> "RowIndex":
        """In memory, from per-row (shard index into `files`, row in shard, label), one block per shard (`stored`:
        rows per file; default: up to the last row named)."""
        shard, row = np.asarray(shard, np.int64), np.asarray(row, np.int64)
        order = np.lexsort((row, shard))  # one sort: grouped by shard, rows ascending
        counts = np.bincount(shard, minlength=len(files))
        used = np.flatnonzero(counts)
        blocks = np.zeros(len(used), BLOCK)
        blocks["file"], blocks["start"] = used, np.cumsum(counts[used]) - counts[used]
        last_row = row[order][blocks["start"] + counts[used] - 1]
        blocks["stored"] = last_row + 1 if stored is None else np.asarray(stored)[used]
        return cls(tuple(str(f) for f in files), blocks, len(row), row[order].astype(np.int32),
                   np.asarray(label)[order].astype(np.int16))


# ---------------------------------------------------------------------------------------------------------------
# The blocks of a store, from its manifest.

def store_blocks(entries: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Every row group of the shards `entries` (manifest entries, in file order) as BLOCK records, all rows in."""
    rows = np.array([e["rows"] for e in entries], np.int64)
    group = np.array([e.get("row_group_rows") or max(e["rows"], 1) for e in entries], np.int64)
    groups = -(-rows // group)
    blocks = np.zeros(int(groups.sum()), BLOCK)
    blocks["file"] = np.repeat(np.arange(len(entries)), groups)
    blocks["group"] = np.arange(len(blocks)) - np.repeat(np.cumsum(groups) - groups, groups)
    blocks["first"] = blocks["group"] * group[blocks["file"]]
    blocks["stored"] = np.minimum(group[blocks["file"]], rows[blocks["file"]] - blocks["first"])
    blocks["start"] = np.cumsum(blocks["stored"]) - blocks["stored"]
    return blocks


def view_blocks(entries: Sequence[Mapping[str, Any]], shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The blocks holding rows (shard index into `entries`, row in shard), which must be in store order (as a view
    keeps them), with `start` = their first row: O(N) in chunks, no pass over the rows per shard."""
    every = store_blocks(entries)
    base = np.searchsorted(every["file"], np.arange(len(entries)))  # first block of each shard
    group = np.array([e.get("row_group_rows") or max(e["rows"], 1) for e in entries], np.int64)
    counts, last = np.zeros(len(every), np.int64), -1
    for a in range(0, len(shard), CHUNK_ROWS):
        s = np.asarray(shard[a:a + CHUNK_ROWS], np.int64)
        block = base[s] + np.asarray(row[a:a + CHUNK_ROWS], np.int64) // group[s]
        if block.size and (block[0] < last or np.any(np.diff(block) < 0)):
            raise ShardError("view rows are not in store order (shard, row); rebuild the view with `raylab select`")
        counts += np.bincount(block, minlength=len(every))
        last = int(block[-1]) if block.size else last
    kept = every[counts > 0]
    kept["start"] = np.cumsum(counts[counts > 0]) - counts[counts > 0]
    return kept


# ---------------------------------------------------------------------------------------------------------------
# On disk.

def write_index(out: str | os.PathLike, meta: Mapping[str, Any], blocks: np.ndarray,
                arrays: Mapping[str, tuple[np.ndarray, np.dtype]] | None = None) -> Path:
    """Write an index directory atomically: a temp directory beside `out`, renamed into place, replacing a stale
    one (callers hold a lock; a process still mapping the old files keeps them). `arrays`: name -> (source,
    dtype), copied in chunks."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        np.save(tmp / "blocks.npy", blocks)
        for name, (source, dtype) in (arrays or {}).items():
            target = open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=(len(source),))
            for a in range(0, len(source), CHUNK_ROWS):
                target[a:a + CHUNK_ROWS] = source[a:a + CHUNK_ROWS]
            target.flush()
            del target
        atomic_write_json(tmp / INDEX_META, {"format": INDEX_FORMAT, **meta, "arrays": ["blocks", *(arrays or {})]})
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the team reads it on a shared root
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as err:
        raise ShardError(f"{out}: cannot write the row index ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    """The index.json of an index directory, or None when there is none (not built yet)."""
    try:
        meta = json.loads((Path(path) / INDEX_META).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return meta if meta.get("format") == INDEX_FORMAT else None


_OPEN: dict[str, tuple[float, RowIndex]] = {}  # path -> (index.json mtime, index): read tasks of a pass reuse it


def open_index(path: str | os.PathLike) -> RowIndex:
    """The index at `path`, its arrays memory-mapped (nothing is read until used)."""
    path = str(path)
    try:
        stamp = os.stat(Path(path) / INDEX_META).st_mtime_ns
    except OSError:
        raise ShardError(f"{path}: no row index ({INDEX_META} missing)") from None
    if path in _OPEN and _OPEN[path][0] == stamp:
        return _OPEN[path][1]
    meta = read_meta(path)
    if meta is None:
        raise ShardError(f"{path}: not a row index ({INDEX_META} missing or of another format)")
    load: Callable[[str], np.ndarray | None] = (
        lambda name: np.load(Path(path) / f"{name}.npy", mmap_mode="r") if name in meta["arrays"] else None)
    store = Path(meta["store"])
    index = RowIndex(tuple(str(store / n) for n in meta["files"]), load("blocks"), int(meta["rows"]), load("row"),
                     load("label"), path)
    _OPEN.clear()  # one index per process at a time: a trial trains on one view
    _OPEN[path] = (stamp, index)
    return index


def ensure_index(out: str | os.PathLike, check: Mapping[str, str | int],
                 build: Callable[[], tuple[dict, np.ndarray, dict]]) -> RowIndex:
    """The index at `out` if it was built from what `check` describes (plain str/int values, compared with its
    index.json); else `build()` -> (meta, blocks, arrays) is written there first, under a lock, so concurrent
    trials of one sweep build it once."""
    out = Path(out)
    meta = read_meta(out)
    if meta is None or meta.get("check") != dict(check):
        with exclusive(out.with_name(f".{out.name}.lock")):
            meta = read_meta(out)
            if meta is None or meta.get("check") != dict(check):
                info, blocks, arrays = build()
                write_index(out, {**info, "check": dict(check)}, blocks, arrays)
    return open_index(out)
