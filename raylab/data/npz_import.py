"""Import the reference's published generated data (`np.savez` files, one or several parts) into one shard store,
in bounded memory, at >= 100K rows/s.

The Wang et al. 2023 authors publish their EDM samples as uncompressed `np.savez` zips with `image` uint8
(N,32,32,3) and `label` int64 (N,), where label is the class the image was generated for; sets of 20M and 50M come
in 2 and 4 parts, and the sets of 5M and more are the per-class files concatenated (training_recipe.md §2), so a
part may hold a few classes only. A part can be tens of GB, so nothing here maps or loads a whole member: a
stored (uncompressed) zip member is the raw `.npy` file, so we find where its bytes start (local zip header, then
the `.npy` header) and read the rows of one shard at a time by offset (`os.pread`). A memory map of the file
instead grew the importer's RSS to 3.1 GB on a 1M-row file (every page it touched).

Which rows a shard holds (`Layout`): the parts, concatenated, are cut into runs of `run_rows` consecutive rows
(16 at the default shard size; runs never cross parts); the runs are taken `shards` at a time in file order (a
stratum) and each stratum is dealt one run per shard in a seeded random order. So every shard holds one run from
every stretch of the whole set, whatever the parts' class layout (a class-sorted set gives each shard every class
within a run or two of its share), and a shard is read in runs of rows, one `pread` per run: the per-row permuted
import took 1.5 minutes per 1M rows, one pread per row. The rows of a shard are then permuted (seeded); shards
hold about N / ceil(N / shard_size) rows each. `order_seed` and the layout are part of the store's identity, so
the mapping can be recomputed (`store_sources`). class_cond = label.

Several parts make one store with one identity (every part's name, size and head/tail hash, in order); a rerun
writes only the shards still missing, `RECORD_EVERY` shards per manifest rewrite (`ShardStore.write_shards`).
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
from numpy.lib import format as npy_format

from raylab.data.shard_format import IMAGE_SHAPE, ShardError
from raylab.data.shard_layout import load_manifest
from raylab.data.shards import ShardStore

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes, then name and extra field
_LOCAL_MAGIC = b"PK\x03\x04"
_HEAD_TAIL_BYTES = 1 << 20

# .npy header readers by format version; savez writes 1.0 (2.0 only for headers over 64 KiB).
_NPY_HEADERS: dict[tuple[int, int], Callable[[BinaryIO], tuple]] = {
    (1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0,
}


@dataclass(frozen=True)
class Member:
    """Where one array's bytes lie inside an uncompressed .npz."""
    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def memmap(self) -> np.ndarray:
        """A read-only map of the array (small reads, tests; the importer itself reads by offset)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                         order="F" if self.fortran else "C")

    def read_rows(self, fd: int, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order, unique) read by offset: one pread per run of consecutive file rows, straight into
        a buffer in file order, then one gather into the order asked."""
        if self.fortran:  # a row is scattered over the file: map, copy the rows, unmap (rare: savez writes C)
            mapped = self.memmap()
            try:
                return np.array(mapped[rows])
            finally:
                del mapped
        rows = np.asarray(rows, np.int64)
        place = np.argsort(rows, kind="stable")
        wanted = rows[place]
        buf = np.empty((len(rows), self.row_bytes), np.uint8)
        view = memoryview(buf.reshape(-1))
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        size = self.row_bytes
        for start, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()):
            got = os.preadv(fd, [view[start * size:stop * size]], self.offset + int(wanted[start]) * size)
            if got != (stop - start) * size:
                raise ShardError(f"{self.path}: truncated (member ends before row {int(wanted[stop - 1])})")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        out.reshape(len(rows), -1).view(np.uint8)[place] = buf
        return out


def _member_offset(f: BinaryIO, info: zipfile.ZipInfo, npz: Path) -> int:
    """Byte offset of a stored member's data: after its *local* header, whose extra field may differ in length
    from the central directory's (zip64 entries, as numpy writes them)."""
    f.seek(info.header_offset)
    magic, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if magic != _LOCAL_MAGIC:
        raise ShardError(f"{npz}: member {info.filename!r} has no valid local zip header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _member(npz: Path, zf: zipfile.ZipFile, key: str, expected: tuple[str, ...] = ("image", "label")) -> Member:
    """Layout of array `key` inside an uncompressed .npz, without reading its data."""
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        raise ShardError(f"{npz}: no array {key!r}; expected keys {' and '.join(map(repr, expected))} "
                         f"(found {[n.removesuffix('.npy') for n in zf.namelist()]})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ShardError(f"{npz}: member {key!r} is compressed (np.savez_compressed); only uncompressed np.savez "
                         f"files can be imported in bounded memory — re-save with np.savez")
    with open(npz, "rb") as f:
        f.seek(_member_offset(f, info, npz))
        version = npy_format.read_magic(f)
        if version not in _NPY_HEADERS:
            raise ShardError(f"{npz}: member {key!r} uses .npy format {version}; supported: {list(_NPY_HEADERS)}")
        shape, fortran, dtype = _NPY_HEADERS[version](f)
        data_offset = f.tell()
    if dtype.hasobject:
        raise ShardError(f"{npz}: member {key!r} holds Python objects; expected a numeric array")
    return Member(npz, data_offset, tuple(shape), dtype, bool(fortran))


def open_npz(npz_path: str | os.PathLike) -> tuple[Member, Member]:
    """(image, label) members of an uncompressed .npz, checked: images (N,32,32,3) uint8, labels (N,) integers."""
    npz = Path(npz_path)
    try:
        with zipfile.ZipFile(npz) as zf:
            images, labels = (_member(npz, zf, k) for k in ("image", "label"))
    except (zipfile.BadZipFile, FileNotFoundError) as err:
        raise ShardError(f"{npz}: not a readable .npz file ({err})") from None
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ShardError(f"{npz}: 'image' is {images.dtype} {images.shape}; expected uint8 (N,32,32,3)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise ShardError(f"{npz}: 'label' is {labels.dtype} {labels.shape}; expected integers ({images.shape[0]},)")
    return images, labels


def open_npz_arrays(npz_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) memory-mapped read-only from an uncompressed .npz; checked."""
    images, labels = open_npz(npz_path)
    return images.memmap(), labels.memmap()


def npz_members(npz_path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Members `keys` of an uncompressed .npz (np.savez), each memory-mapped read-only (nothing read until used)."""
    npz = Path(npz_path)
    try:
        with zipfile.ZipFile(npz) as zf:
            return {k: _member(npz, zf, k, keys).memmap() for k in keys}
    except (zipfile.BadZipFile, FileNotFoundError) as err:
        raise ShardError(f"{npz}: not a readable .npz file ({err})") from None


@dataclass(frozen=True)
class Part:
    """One file of a (multi-part) set: its members and its place on the set's row axis."""
    path: Path
    images: Member
    labels: Member
    base: int  # global row of its first row

    @property
    def rows(self) -> int:
        return self.images.shape[0]


def open_parts(paths: Sequence[str | os.PathLike]) -> list[Part]:
    """Every part checked (`open_npz`) before any is read; the set's rows are the parts' rows in the order given."""
    if not paths:
        raise ShardError("import-npz: name at least one .npz part")
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ShardError(f"import-npz: a part is named twice in {[str(p) for p in paths]}")
    parts, base = [], 0
    for path in paths:
        images, labels = open_npz(path)
        parts.append(Part(Path(path), images, labels, base))
        base += images.shape[0]
    return parts


def part_identity(part: Part) -> dict:
    """Identity of one part: name, size, rows, and sha256 of its first and last MiB.

    A full sha256 of a multi-GB file would cost a whole read on every (re)run; size + head/tail catches a
    different or truncated file (the head holds the zip/npy headers and first images, the tail the central
    directory and the labels).
    """
    size, h = part.path.stat().st_size, hashlib.sha256()
    with open(part.path, "rb") as f:
        h.update(f.read(_HEAD_TAIL_BYTES))
        f.seek(max(size - _HEAD_TAIL_BYTES, 0))
        h.update(f.read(_HEAD_TAIL_BYTES))
    return {"file": part.path.name, "bytes": size, "rows": part.rows, "sha256_head_tail": h.hexdigest()}


# ---------------------------------------------------------------------------------------------------------------
# Which rows each shard holds.

RUN_ROWS = 16  # rows per read: 48 KB; a 10,000-row shard is ~625 runs, one from each stretch of the set
MIN_RUNS = 64  # runs per shard at least: smaller shards read shorter runs (a shard of 100 rows, single rows)


@dataclass(frozen=True)
class Layout:
    """The deal of a set's rows over its shards (module docstring): `part_rows` rows per part, `shards` shards,
    runs of `run_rows` rows, strata dealt by `order_seed`."""
    part_rows: tuple[int, ...]
    shards: int
    run_rows: int
    order_seed: int

    @classmethod
    def of(cls, part_rows: Sequence[int], shard_size: int, order_seed: int) -> "Layout":
        n = sum(part_rows)
        if n < 1:
            raise ShardError("import-npz: the parts hold no rows")
        run = max(1, min(RUN_ROWS, shard_size // MIN_RUNS))
        runs = sum(-(-int(r) // run) for r in part_rows)  # every shard gets a run of the first stratum at least
        return cls(tuple(int(r) for r in part_rows), min(-(-n // shard_size), runs), run, order_seed)

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(first global row, rows) of every run, in file order: 16 bytes a run (~50 MB at 50M rows)."""
        bases = np.cumsum((0,) + self.part_rows[:-1])
        firsts = [b + np.arange(0, n, self.run_rows, dtype=np.int64) for b, n in zip(bases, self.part_rows)]
        first = np.concatenate(firsts) if firsts else np.empty(0, np.int64)
        ends = np.concatenate([np.minimum(f + self.run_rows, b + n)
                               for f, b, n in zip(firsts, bases, self.part_rows)]) if firsts else first
        return first, ends - first

    def dealt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(run first rows, run lengths, runs grouped by shard, where each shard's group starts [shards + 1])."""
        first, length = self.runs()
        shard_of = np.empty(len(first), np.int32)
        for t, a in enumerate(range(0, len(first), self.shards)):
            deal = np.random.default_rng([self.order_seed, t]).permutation(self.shards)
            shard_of[a:a + self.shards] = deal[:len(shard_of[a:a + self.shards])]
        grouped = np.argsort(shard_of, kind="stable")  # each shard's runs in file order
        return first, length, grouped, np.searchsorted(shard_of[grouped], np.arange(self.shards + 1))

    def shard_rows(self, dealt: tuple, shard: int) -> np.ndarray:
        """Global rows of shard `shard` in store order: its runs, then permuted (seeded)."""
        first, length, grouped, bounds = dealt
        runs = grouped[bounds[shard]:bounds[shard + 1]]
        n = length[runs]
        rows = np.repeat(first[runs] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        return rows[np.random.default_rng([self.order_seed, 1, shard]).permutation(len(rows))]

    def seed_ranges(self, dealt: tuple) -> list[tuple[int, int]]:
        """Inclusive (first, last) seed range of each shard: the store rows, shard after shard."""
        _, length, grouped, bounds = dealt
        ends = np.append(0, np.cumsum(length[grouped]))[bounds]
        return [(int(a), int(b) - 1) for a, b in zip(ends[:-1], ends[1:])]


def store_sources(part_rows: Sequence[int], shard_size: int, order_seed: int = 0) -> np.ndarray:
    """Global file row of every store row (seed), all shards: O(N) memory, for checks on small sets."""
    layout = Layout.of(part_rows, shard_size, order_seed)
    dealt = layout.dealt()
    return np.concatenate([layout.shard_rows(dealt, s) for s in range(layout.shards)])


def _check_args(shard_size: Any, identity_extra: Any, order_seed: Any, num_classes: Any) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard_size={shard_size!r} must be an integer >= 1")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ShardError(f"num_classes={num_classes!r} must be an integer >= 1")
    if identity_extra is not None and not isinstance(identity_extra, dict):
        raise ShardError(f"identity_extra must be a dict, got {type(identity_extra).__name__}")
    if isinstance(order_seed, bool) or not isinstance(order_seed, int) or order_seed < 0:
        raise ShardError(f"order_seed={order_seed!r} must be an integer >= 0")


LABEL_CHUNK = 1 << 22  # labels per read of the label check: 32 MB of int64


def check_labels(part: Part, num_classes: int) -> None:
    """Every label of the part is a class of the dataset it was generated for, checked before a store exists (a
    label past the last class would only fail, or train a class the model does not have, when training reads it);
    read in chunks: a 12.5M-row part's labels are 100 MB."""
    fd, count, first = os.open(part.path, os.O_RDONLY), 0, None
    try:
        for a in range(0, part.rows, LABEL_CHUNK):
            labels = part.labels.read_rows(fd, np.arange(a, min(a + LABEL_CHUNK, part.rows)))
            bad = labels[(labels < 0) | (labels >= num_classes)]
            count, first = count + len(bad), first if first is not None or not len(bad) else bad[0]
    finally:
        os.close(fd)
    if count:
        raise ShardError(f"{part.path}: label {first} ({count} row(s)) is not a class of a {num_classes}-class "
                         f"dataset (labels must lie in [0, {num_classes})); set data.dataset to the dataset it was "
                         "generated for")


def _read_shard(parts: list[Part], fds: list[int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of global `rows`, in that order: each part's rows read in runs (one pread per run)."""
    which = np.searchsorted([p.base for p in parts], rows, side="right") - 1
    if len(parts) == 1:  # no second copy of the shard's images
        return parts[0].images.read_rows(fds[0], rows), parts[0].labels.read_rows(fds[0], rows)
    images = np.empty((len(rows), *IMAGE_SHAPE), np.uint8)
    labels = np.empty(len(rows), np.int64)
    for i in np.unique(which):
        at = np.flatnonzero(which == i)
        local = rows[at] - parts[i].base
        images[at] = parts[i].images.read_rows(fds[i], local)
        labels[at] = parts[i].labels.read_rows(fds[i], local)
    return images, labels


def import_npz(npz_paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
               shard_size: int = 10_000, identity_extra: dict[str, Any] | None = None, order_seed: int = 0, *,
               num_classes: int) -> ShardStore:
    """Convert one or several `np.savez` files (keys image, label; labels in [0, num_classes)), concatenated in the
    order given, into one store under out_dir, rows dealt over the shards (`Layout`); reruns write only the missing
    shards."""
    _check_args(shard_size, identity_extra, order_seed, num_classes)
    paths = [npz_paths] if isinstance(npz_paths, (str, os.PathLike)) else list(npz_paths)
    parts = open_parts(paths)
    for part in parts:
        check_labels(part, num_classes)
    layout = Layout.of([p.rows for p in parts], shard_size, order_seed)
    identity = {"source": "npz", "parts": [part_identity(p) for p in parts], "shard_size": shard_size,
                "order": "dealt-runs", "run_rows": layout.run_rows, "order_seed": order_seed, **(identity_extra or {})}
    store = _open_store(out_dir, identity)
    dealt = layout.dealt()
    ranges = layout.seed_ranges(dealt)
    todo = set(store.missing(ranges))
    if not todo:
        return store
    fds = [os.open(p.path, os.O_RDONLY) for p in parts]
    try:
        store.write_shards(_shards(parts, fds, layout, dealt, ranges, todo))
    finally:
        for fd in fds:
            os.close(fd)
    return store


PREFETCH = 2  # shards read ahead by a second thread while the current one is encoded and written


def _shards(parts: list[Part], fds: list[int], layout: Layout, dealt: tuple, ranges: list[tuple[int, int]],
            todo: set[tuple[int, int]]) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """The missing shards' columns, in order. A reader thread keeps PREFETCH shards ahead (preads, Parquet
    encoding, sha256 and fsync all release the GIL): memory is 1 + PREFETCH shards."""
    def read(shard: int, first: int, last: int) -> tuple[int, int, dict[str, np.ndarray]]:
        image, label = _read_shard(parts, fds, layout.shard_rows(dealt, shard))
        return first, last, {"image": image, "label": label, "seed": np.arange(first, last + 1, dtype=np.int64),
                             "class_cond": label}

    work = [(shard, first, last) for shard, (first, last) in enumerate(ranges) if (first, last) in todo]
    with ThreadPoolExecutor(1, thread_name_prefix="import-npz-read") as pool:
        ahead: deque = deque()
        for item in work:
            ahead.append(pool.submit(read, *item))
            if len(ahead) > PREFETCH:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _open_store(out_dir: str | os.PathLike, identity: dict) -> ShardStore:
    """The store for `identity`; for a store of other parts or settings, one line naming what differs."""
    try:
        return ShardStore(out_dir).create_or_open(identity)
    except ShardError:
        held = load_manifest(out_dir)["identity"]
        if not isinstance(held, dict) or "parts" not in held:
            raise
        theirs, ours = held["parts"], identity["parts"]
        differ = [o["file"] for i, o in enumerate(ours) if i >= len(theirs) or theirs[i] != o]
        if differ or len(theirs) != len(ours):
            what = f"part(s) {differ or [t['file'] for t in theirs[len(ours):]]} differ in name, size or content"
        else:
            what = "settings " + ", ".join(f"{k}={identity.get(k)!r} (store: {held.get(k)!r})"
                                          for k in sorted(set(held) | set(identity))
                                          if k != "parts" and held.get(k) != identity.get(k))
        raise ShardError(f"{out_dir}: the store holds the identity of another import (from "
                         f"{[t['file'] for t in theirs]}): {what}; use another directory or the same parts "
                         "and settings") from None
