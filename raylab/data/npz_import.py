"""Import the reference's published generated data (`np.savez` files) into a shard store, in bounded memory.

The Wang et al. 2023 authors publish their EDM samples as an uncompressed `np.savez` zip with `image` uint8 (N,32,32,3)
and `label` int64 (N,), where label is the class the image was generated for. Such a file can be tens of GB, so
nothing here loads a whole member: a stored (uncompressed) zip member is the raw `.npy` file, so we find where
its bytes start (local zip header, then the `.npy` header) and `np.memmap` the array in place, then copy
`shard_size` rows at a time into shards. Peak memory is about one shard, whatever N is.

Row i gets seed i (the file's row order is its only stable identity) and class_cond = label.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from numpy.lib import format as npy_format

from raylab.data.shards import IMAGE_SHAPE, ShardError, ShardStore

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes, then name and extra field
_LOCAL_MAGIC = b"PK\x03\x04"
_HEAD_TAIL_BYTES = 1 << 20

# .npy header readers by format version; savez writes 1.0 (2.0 only for headers over 64 KiB).
_NPY_HEADERS: dict[tuple[int, int], Callable[[BinaryIO], tuple]] = {
    (1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0,
}


def _member_offset(f: BinaryIO, info: zipfile.ZipInfo, npz: Path) -> int:
    """Byte offset of a stored member's data: after its *local* header, whose extra field may differ in length
    from the central directory's (zip64 entries, as numpy writes them)."""
    f.seek(info.header_offset)
    magic, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if magic != _LOCAL_MAGIC:
        raise ShardError(f"{npz}: member {info.filename!r} has no valid local zip header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _memmap_member(npz: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Read-only memmap of array `key` inside an uncompressed .npz, without reading its data."""
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
    return np.memmap(npz, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran else "C")


def open_npz_arrays(npz_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,32,32,3) uint8, labels (N,) integer) memory-mapped from an uncompressed .npz; checked."""
    npz = Path(npz_path)
    try:
        with zipfile.ZipFile(npz) as zf:
            images, labels = (_memmap_member(npz, zf, k) for k in ("image", "label"))
    except (zipfile.BadZipFile, FileNotFoundError) as err:
        raise ShardError(f"{npz}: not a readable .npz file ({err})") from None
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ShardError(f"{npz}: 'image' is {images.dtype} {images.shape}; expected uint8 (N,32,32,3)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise ShardError(f"{npz}: 'label' is {labels.dtype} {labels.shape}; expected integers ({len(images)},)")
    return images, labels


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


def import_npz(npz_path: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 10_000,
               identity_extra: dict[str, Any] | None = None) -> ShardStore:
    """Convert an `np.savez` file (keys image, label) into shards under out_dir; reruns skip finished shards."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ShardError(f"shard_size={shard_size!r} must be an integer >= 1")
    if identity_extra is not None and not isinstance(identity_extra, dict):
        raise ShardError(f"identity_extra must be a dict, got {type(identity_extra).__name__}")
    images, labels = open_npz_arrays(npz_path)
    store = ShardStore(out_dir).create_or_open(npz_identity(npz_path, shard_size, identity_extra))
    for first, last in store.missing(seed_ranges(len(images), shard_size)):
        label = np.array(labels[first:last + 1])  # small copy; images go from the memmap straight into Arrow
        store.write_shard(first, last, {"image": np.ascontiguousarray(images[first:last + 1]), "label": label,
                                        "seed": np.arange(first, last + 1, dtype=np.int64), "class_cond": label})
    return store
