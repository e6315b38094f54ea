"""Shard format: the column schema of a shard, image encoding/decoding, and validated tables from user columns.

Columns: `image` (3072 raw HWC uint8 bytes), `label` int16, `seed` int64, `class_cond` int16 (−1 when
unconditional), and after scoring `score` float32, `pred` int16, `confidence` float32 (DESIGN.md, "Data
contracts"). Pure pyarrow/numpy: no files, no manifest (those are `raylab.data.shard_layout` and
`raylab.data.shards`). Also home of `ShardError`, which every shard module raises.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa

from raylab.data.datasets import IMAGE_SHAPE


class ShardError(ValueError):
    """A one-line message naming the store, shard file or column at fault."""


# ---------------------------------------------------------------------------------------------------------------
# Schema.

IMAGE_BYTES = math.prod(IMAGE_SHAPE)  # 3072
# Image column type: fixed_size_binary(3072) (= DESIGN.md's `binary(3072)`), chosen by bench/bench_shard_read.py
# (50k random images, 5 shards, interleaved rounds; quiet 2-core box): pyarrow read_table + decode 477k vs 305k
# img/s for variable `binary` (fixed 1.6x faster; 1.7-1.9x in 4 earlier runs on a loaded box); Ray Data read ->
# iter_batches(1024, pyarrow) -> float NCHW 24.1k vs 22.5k (1.07x, within run-to-run noise); list<uint8> is 33x
# (pyarrow) and 3x (Ray Data) slower and twice the bytes. The fixed width also lets the schema itself reject a
# wrong-sized image. (A measurement on another machine saw binary ahead through Ray Data, 62k vs 42k; we could not
# reproduce a gap.)
IMAGE_TYPE = pa.binary(3072)

# numpy dtype of every non-image column (kept here: pa.DataType.to_pandas_dtype would import pandas).
NUMPY_DTYPES: dict[str, type] = {"label": np.int16, "seed": np.int64, "class_cond": np.int16,
                                 "score": np.float32, "pred": np.int16, "confidence": np.float32}
COLUMN_TYPES: dict[str, pa.DataType] = {"image": IMAGE_TYPE,
                                        **{k: pa.from_numpy_dtype(v) for k, v in NUMPY_DTYPES.items()}}
REQUIRED_COLUMNS = ("image", "label", "seed", "class_cond")
OPTIONAL_COLUMNS = ("score", "pred", "confidence")
# Smallest allowed value per integer column (the dtype bounds the rest); class_cond −1 = unconditional.
_INT_MIN = {"label": 0, "class_cond": -1, "pred": 0, "seed": 0}


def shard_schema(columns: Iterable[str]) -> pa.Schema:
    """Schema of a shard with `columns` (required ones plus any optional ones), in canonical order."""
    present = set(columns)
    return pa.schema([(c, COLUMN_TYPES[c]) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in present])


# ---------------------------------------------------------------------------------------------------------------
# Image encoding and decoding. Never via numpy `S3072` arrays: pa.array() strips their trailing NUL bytes, so an
# image ending in black pixels would shrink (reference/ray_mlflow.md §2). Buffers are wrapped instead.

def encode_images(images: np.ndarray, image_type: pa.DataType = IMAGE_TYPE) -> pa.Array:
    """(N,32,32,3) or (N,3072) uint8 → a binary / fixed_size_binary(3072) array sharing the numpy buffer."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ShardError(f"column 'image': expected a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.shape[1:] not in (IMAGE_SHAPE, (IMAGE_BYTES,)):
        raise ShardError(f"column 'image': shape {images.shape} must be (N,32,32,3) or (N,3072)")
    n, data = len(images), pa.py_buffer(np.ascontiguousarray(images))
    if pa.types.is_fixed_size_binary(image_type) and image_type.byte_width == IMAGE_BYTES:
        return pa.FixedSizeBinaryArray.from_buffers(image_type, n, [None, data])
    if image_type in (pa.binary(), pa.large_binary()):
        width = np.int64 if image_type == pa.large_binary() else np.int32
        if n * IMAGE_BYTES > np.iinfo(width).max:
            raise ShardError(f"column 'image': {n} images overflow {image_type} offsets; use large_binary")
        offsets = np.arange(n + 1, dtype=width) * IMAGE_BYTES
        return pa.Array.from_buffers(image_type, n, [None, pa.py_buffer(offsets), data])
    raise ShardError(f"image type {image_type} not supported; use binary, large_binary or fixed_size_binary(3072)")


def _fixed_view(arr: pa.Array) -> np.ndarray:
    if arr.type.byte_width != IMAGE_BYTES:
        raise ShardError(f"column 'image': {arr.type} holds {arr.type.byte_width}-byte values, not {IMAGE_BYTES}")
    flat = np.frombuffer(arr.buffers()[1], np.uint8)
    return flat[arr.offset * IMAGE_BYTES:(arr.offset + len(arr)) * IMAGE_BYTES]


def _offsets_view(arr: pa.Array) -> np.ndarray:
    width = np.int64 if arr.type == pa.large_binary() else np.int32
    offsets = np.frombuffer(arr.buffers()[1], width)[arr.offset:arr.offset + len(arr) + 1]
    if np.any(np.diff(offsets) != IMAGE_BYTES):
        raise ShardError(f"column 'image': every value must be {IMAGE_BYTES} bytes (32×32×3 uint8)")
    return np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]


# Keyed by Arrow type id; each returns the contiguous value bytes of one chunk without copying.
_IMAGE_VIEWS: dict[int, Callable[[pa.Array], np.ndarray]] = {
    pa.binary(IMAGE_BYTES).id: _fixed_view, pa.binary().id: _offsets_view, pa.large_binary().id: _offsets_view,
}


def _chunk_images(arr: pa.Array) -> np.ndarray:
    if arr.type.id not in _IMAGE_VIEWS:
        raise ShardError(f"column 'image': type {arr.type} is not binary/large_binary/fixed_size_binary(3072)")
    if arr.null_count:
        raise ShardError(f"column 'image': {arr.null_count} null values")
    if len(arr) == 0:
        return np.empty((0, *IMAGE_SHAPE), np.uint8)
    return _IMAGE_VIEWS[arr.type.id](arr).reshape(-1, *IMAGE_SHAPE)


def decode_images(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Image column → (N,32,32,3) uint8. Zero-copy (read-only view) for one chunk; one copy to join several."""
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks == 1:
            return _chunk_images(col.chunk(0))
        parts = [_chunk_images(c) for c in col.chunks]
        return np.concatenate(parts) if parts else np.empty((0, *IMAGE_SHAPE), np.uint8)
    return _chunk_images(col)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Shard table → dict of numpy arrays; `image` becomes (N,32,32,3) uint8."""
    return {n: decode_images(c) if n == "image" else c.to_numpy() for n, c in zip(table.column_names,
                                                                                   table.columns)}


# ---------------------------------------------------------------------------------------------------------------
# Building a validated shard table from user columns.

def _encode_int(name: str, values: np.ndarray) -> pa.Array:
    target = NUMPY_DTYPES[name]
    if not np.issubdtype(values.dtype, np.integer):
        raise ShardError(f"column {name!r}: dtype {values.dtype} is not an integer type")
    lo, hi = _INT_MIN.get(name, np.iinfo(target).min), np.iinfo(target).max
    if values.size and (values.min() < lo or values.max() > hi):
        raise ShardError(f"column {name!r}: values must lie in [{lo}, {hi}], got [{values.min()}, {values.max()}]")
    return pa.array(values.astype(target, copy=False))


def _encode_float(name: str, values: np.ndarray) -> pa.Array:
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ShardError(f"column {name!r}: dtype {values.dtype} is not a float type")
    return pa.array(values.astype(np.float32, copy=False))


_ENCODERS: dict[str, Callable[[str, np.ndarray], pa.Array]] = {
    "image": lambda _name, v: encode_images(v), "label": _encode_int, "seed": _encode_int,
    "class_cond": _encode_int, "score": _encode_float, "pred": _encode_int, "confidence": _encode_float,
}


def _as_numpy(columns: Mapping[str, np.ndarray] | pa.Table) -> dict[str, np.ndarray]:
    """A pa.Table or a dict of arrays → dict of numpy arrays (image decoded), rejecting nulls."""
    if not isinstance(columns, pa.Table):
        if not isinstance(columns, Mapping):
            raise ShardError(f"shard columns must be a dict of numpy arrays or a pa.Table, got {type(columns)}")
        return {k: np.asarray(v) for k, v in columns.items()}
    for name, col in zip(columns.column_names, columns.columns):
        if col.null_count:
            raise ShardError(f"column {name!r}: {col.null_count} null values")
    return table_to_numpy(columns)


def _check_column_set(names: Iterable[str]) -> None:
    names = set(names)
    unknown, missing = names - set(COLUMN_TYPES), set(REQUIRED_COLUMNS) - names
    if unknown or missing:
        raise ShardError(f"shard columns: missing {sorted(missing)}, unknown {sorted(unknown)}; required "
                         f"{list(REQUIRED_COLUMNS)}, optional {list(OPTIONAL_COLUMNS)}")


def build_table(columns: Mapping[str, np.ndarray] | pa.Table, first_seed: int, last_seed: int) -> pa.Table:
    """Validate columns (names, dtypes, lengths, seeds unique and in range) and return the canonical table."""
    data = _as_numpy(columns)
    _check_column_set(data)
    for name, values in data.items():
        if name != "image" and values.ndim != 1:
            raise ShardError(f"column {name!r}: expected a 1-D array, got shape {values.shape}")
    lengths = {k: len(v) for k, v in data.items() if v.ndim}
    if len(set(lengths.values())) > 1:
        raise ShardError(f"shard columns have different lengths: {lengths}")
    seeds = data["seed"]
    if seeds.size and (seeds.min() < first_seed or seeds.max() > last_seed):
        raise ShardError(f"column 'seed': values [{seeds.min()}, {seeds.max()}] lie outside the shard's range "
                         f"[{first_seed}, {last_seed}]")
    if np.unique(seeds).size != seeds.size:
        raise ShardError("column 'seed': seeds must be unique within a shard")
    schema = shard_schema(data)
    return pa.Table.from_arrays([_ENCODERS[n](n, data[n]) for n in schema.names], schema=schema)
