"""Import the reference's published generated data (`np.savez` files) into a shard store, in bounded memory.

The Wang et al. 2023 authors publish their EDM samples as an uncompressed `np.savez` zip with `image` uint8 (N,32,32,3)
and `label` int64 (N,), where label is the class the image was generated for, concatenated class by class. Such a
file can be tens of GB, so nothing here maps or loads a whole member: a stored (uncompressed) zip member is the raw
`.npy` file, so we find where its bytes start (local zip header, then the `.npy` header) and read the rows of one
shard at a time by offset (`os.pread`). Peak memory is about one shard plus 16 bytes a row for the labels and the
order; a memory map of the file instead grew the importer's RSS to 3.1 GB on a 1M-row file (every page it touched).

The shards hold the file's rows in a seeded random order: store row k (its `seed`) is file row order[k], with
`order = permutation(N)` seeded by `order_seed` (part of the identity, so the mapping can be recomputed). A
class-sorted file imported in file order would give training batches of one class (`raylab.data.mix`).
class_cond = label.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from numpy.lib import format as npy_format

from raylab.data.shard_format import IMAGE_SHAPE, ShardError
from raylab.data.shards import ShardStore

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes, then name and extra field
_LOCAL_MAGIC = b"PK\x03\x04"
_HEAD_TAIL_BYTES = 1 << 20
_LABEL_CHUNK = 1 << 20  # labels per read

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
        """Rows `rows` (any order, unique) read by offset: one pread per run of consecutive file rows, each copied
        straight to its place in the output."""
        if self.fortran:  # a row is scattered over the file: map, copy the rows, unmap (rare: savez writes C)
            mapped = self.memmap()
            try:
                return np.array(mapped[rows])
            finally:
                del mapped
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        place = np.argsort(rows, kind="stable")
        wanted = rows[place]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            want = (stop - start) * self.row_bytes
            data = os.pread(fd, want, self.offset + int(wanted[start]) * self.row_bytes)
            if len(data) != want:
                raise ShardError(f"{self.path}: truncated (member ends before row {int(wanted[stop - 1])})")
            flat[place[start:stop]] = np.frombuffer(data, np.uint8).reshape(stop - start, -1)
        return out

    def read_all(self, fd: int) -> np.ndarray:
        """The whole (small: labels) array, read in chunks."""
        n = self.shape[0]
        return np.concatenate([self.read_rows(fd, np.arange(a, min(a + _LABEL_CHUNK, n)))
                               for a in range(0, n, _LABEL_CHUNK)] or [np.empty(self.shape, self.dtype)])


def _member_offset(f: BinaryIO, info: zipfile.ZipInfo, npz: Path) -> int:
    """Byte offset of a stored member's data: after its *local* header, whose extra field may differ in length
    from the central directory's (zip64 entries, as numpy writes them)."""
    f.seek(info.header_offset)
    magic, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if magic != _LOCAL_MAGIC:
        raise ShardError(f"{npz}: member {info.filename!r} has no valid local zip header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _member(npz: Path, zf: zipfile.ZipFile, key: str) -> Member:
    """Layout of array `key` inside an uncompressed .npz, without reading its data."""
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        raise ShardError(f"{npz}: no array {key!r}; expected keys 'image' and 'label' "
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


def npz_identity(npz_path: str | os.PathLike, shard_size: int, extra: dict[str, Any] | None = None) -> dict:
    """Identity of an imported file: name, size, and sha256 of its first and last MiB.

    A full sha256 of a multi-GB file would cost a whole read on every (re)run; size + head/tail catches a
    different or truncated file (the head holds the zip/npy headers and first images, the tail the central
    directory and the labels). shard_size is part of it because it fixes the seed ranges of the shards.
    """
    path = Path(npz_path)
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_TAIL_BYTES))
        f.seek(max(size - _HEAD_TAIL_BYTES, 0))
        h.update(f.read(_HEAD_TAIL_BYTES))
    return {"source": "npz", "file": path.name, "bytes": size, "sha256_head_tail": h.hexdigest(),
            "shard_size": shard_size, **(extra or {})}


def seed_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) seed ranges covering 0..n-1 in blocks of shard_size."""
    return [(a, min(a + shard_size, n) - 1) for a in range(0, n, shard_size)]


def import_order(n: int, order_seed: int) -> np.ndarray:
    """File row of every store row: a seeded permutation of 0..n-1."""
    return np.random.default_rng(order_seed).permutation(n)


def _check_args(shard_size: Any, identity_extra: Any, order_seed: Any, num_classes: Any) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard_size={shard_size!r} must be an integer >= 1")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ShardError(f"num_classes={num_classes!r} must be an integer >= 1")
    if identity_extra is not None and not isinstance(identity_extra, dict):
        raise ShardError(f"identity_extra must be a dict, got {type(identity_extra).__name__}")
    if isinstance(order_seed, bool) or not isinstance(order_seed, int) or order_seed < 0:
        raise ShardError(f"order_seed={order_seed!r} must be an integer >= 0")


def check_labels(npz: Path, labels: np.ndarray, num_classes: int) -> None:
    """Every label is a class of the dataset the file was generated for, checked before a store exists: a label past
    the last class would only fail (or train a class the model does not have) when training reads it."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ShardError(f"{npz}: label {bad[0]} ({len(bad)} row(s)) is not a class of a {num_classes}-class dataset "
                         f"(labels must lie in [0, {num_classes})); set data.dataset to the dataset it was generated for")


def import_npz(npz_path: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 10_000,
               identity_extra: dict[str, Any] | None = None, order_seed: int = 0, *, num_classes: int) -> ShardStore:
    """Convert an `np.savez` file (keys image, label; labels in [0, num_classes)) into shards under out_dir, rows in
    a seeded random order; reruns skip finished shards."""
    _check_args(shard_size, identity_extra, order_seed, num_classes)
    images, labels_member = open_npz(npz_path)
    n = images.shape[0]
    fd = os.open(images.path, os.O_RDONLY)
    try:
        labels = labels_member.read_all(fd)
        check_labels(images.path, labels, num_classes)
        identity = npz_identity(npz_path, shard_size, {"order": "permuted", "order_seed": order_seed,
                                                       **(identity_extra or {})})
        store = ShardStore(out_dir).create_or_open(identity)
        todo = store.missing(seed_ranges(n, shard_size))
        order = import_order(n, order_seed) if todo else None
        for first, last in todo:
            rows = order[first:last + 1]
            image, label = images.read_rows(fd, rows), labels[rows]
            store.write_shard(first, last, {"image": image, "label": label,
                                            "seed": np.arange(first, last + 1, dtype=np.int64), "class_cond": label})
    finally:
        os.close(fd)
    return store
