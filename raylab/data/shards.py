"""Generated-data shard store: Parquet shards of 32×32×3 images, one per fixed seed range, plus a manifest.

Layout of a store directory (DESIGN.md, "Data contracts")::

    manifest.json                       identity + one entry per shard (seed range, rows, sha256, bytes, columns)
    gen-0000000000-0000009999.parquet   seeds 0..9999 inclusive
    gen-0000010000-0000019999.parquet
    .manifest.lock                      flock target: writers read-modify-write the manifest under it

Columns: `image` (3072 raw HWC uint8 bytes), `label` int16, `seed` int64, `class_cond` int16 (−1 when
unconditional), and after scoring `score` float32, `pred` int16, `confidence` float32. The generator / sampler /
scorer identity lives once in the manifest and in each file's key-value metadata, never per row. Every shard of
a store has the same columns (recorded per entry, enforced on write), so shards always concatenate.

Crash safety: a shard is written to a hidden temp file in the same directory, fsynced, renamed into place, and
only then recorded in the manifest, so a shard listed in the manifest is always complete. Readers check every file
against the manifest (size + sha256) before using it; `verify_store` lists every problem of a store.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.io import atomic_write_json, sha256_file


class ShardError(ValueError):
    """A one-line message naming the store, shard file or column at fault."""


# ---------------------------------------------------------------------------------------------------------------
# Schema.

IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
# Image column type: fixed_size_binary(3072) (= DESIGN.md's `binary(3072)`), chosen by bench/bench_shard_read.py
# (50k random images, 5 shards, interleaved rounds, 2-core box shared with other jobs): pyarrow read_table +
# decode 454k vs 267k img/s for variable `binary` (fixed 1.7–1.9× faster in all 4 runs); Ray Data read →
# iter_batches(1024, pyarrow) → float NCHW a tie (16.4k vs 16.0k; binary/fixed 0.88–1.24× across runs, within
# the load noise); list<uint8> is 4–50× slower and twice the bytes. The fixed width also lets the schema itself
# reject a wrong-sized image.
# (reference/ray_mlflow.md §2 saw binary ahead through Ray Data, 62k vs 42k; we could not reproduce a gap.)
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

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
FORMAT = 1
_SHARD_RE = re.compile(r"^gen-(\d{10})-(\d{10})\.parquet$")
_MAX_SEED = 10**10 - 1  # the file name has 10 digits per seed
_META_IDENTITY, _META_HASH = b"raylab.identity", b"raylab.identity_hash"


def shard_name(first_seed: int, last_seed: int) -> str:
    """File name of the shard holding seeds first_seed..last_seed (inclusive)."""
    return f"gen-{first_seed:010d}-{last_seed:010d}.parquet"


def shard_schema(columns: Iterable[str]) -> pa.Schema:
    """Schema of a shard with `columns` (required ones plus any optional ones), in canonical order."""
    present = set(columns)
    return pa.schema([(c, COLUMN_TYPES[c]) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in present])


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: the same identity always hashes the same."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ShardError(f"store identity must be plain JSON (dict/list/str/number/bool/None): {err}") from None


def identity_hash(identity: Any) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


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


# ---------------------------------------------------------------------------------------------------------------
# Manifest.

def _check_range(first_seed: int, last_seed: int) -> None:
    ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in (first_seed, last_seed))
    if not ok or not 0 <= first_seed <= last_seed <= _MAX_SEED:
        raise ShardError(f"seed range ({first_seed!r}, {last_seed!r}) must be integers with "
                         f"0 <= first <= last <= {_MAX_SEED}")


def _check_manifest(m: Any, path: Path) -> dict:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path}: not a format-{FORMAT} shard manifest")
    if not {"identity", "identity_hash", "shards"} <= m.keys() or not isinstance(m["shards"], dict):
        raise ShardError(f"{path}: manifest needs keys identity, identity_hash, shards")
    fields = {"first_seed": int, "last_seed": int, "rows": int, "sha256": str, "bytes": int, "columns": list}
    for name, entry in m["shards"].items():
        bad = [k for k, t in fields.items() if not isinstance(entry, dict) or not isinstance(entry.get(k), t)]
        if bad:
            raise ShardError(f"{path}: shard entry {name!r} lacks valid {bad}")
    return m


def load_manifest(root: str | os.PathLike) -> dict:
    """The validated manifest of a store; ShardError naming the file when missing or malformed."""
    path = Path(root) / MANIFEST_NAME
    try:
        return _check_manifest(json.loads(path.read_text()), path)
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest missing (not a shard store, or never created)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: manifest is not valid JSON ({err})") from None


@contextlib.contextmanager
def _manifest_lock(root: Path) -> Iterator[None]:
    """Exclusive flock across processes and threads (each call opens its own file description)."""
    with open(root / LOCK_NAME, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sorted_entries(manifest: dict) -> list[tuple[str, dict]]:
    return sorted(manifest["shards"].items(), key=lambda kv: kv[1]["first_seed"])


def _check_fits(manifest: dict, name: str, first: int, last: int, columns: list[str]) -> None:
    """A new shard must not overlap another range and must have the store's column set."""
    for other, e in manifest["shards"].items():
        if other == name:
            continue
        if e["first_seed"] <= last and first <= e["last_seed"]:
            raise ShardError(f"shard {name} overlaps {other} already in the store")
        if e["columns"] != columns:
            raise ShardError(f"shard {name} has columns {columns} but the store's shards have {e['columns']}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard_file(table: pa.Table, path: str | os.PathLike) -> None:
    """Write one shard table to Parquet with the options every shard uses (the bench reuses them)."""
    # Dictionary encoding is useless on unique 3072-byte images, so only the small int columns get it; one row
    # group per shard (shards are ~30 MB), snappy as everywhere else in Parquet land.
    small = [c for c in table.column_names if c != "image"]
    pq.write_table(table, path, use_dictionary=small, compression="snappy")


# ---------------------------------------------------------------------------------------------------------------
# The store.

class ShardStore:
    """A directory of generated-data shards. Picklable (just the path), so Ray actors can each hold one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ShardStore({str(self.root)!r})"

    @property
    def manifest(self) -> dict:
        """The manifest as on disk now (re-read every time: other writers may have added shards)."""
        return load_manifest(self.root)

    @property
    def identity_hash(self) -> str:
        return self.manifest["identity_hash"]

    def create_or_open(self, identity: Any) -> "ShardStore":
        """Create the directory and an empty manifest, or open an existing store with the same identity."""
        wanted = identity_hash(identity)
        self.root.mkdir(parents=True, exist_ok=True)
        with _manifest_lock(self.root):
            if (self.root / MANIFEST_NAME).exists():
                found = load_manifest(self.root)["identity_hash"]
                if found != wanted:
                    raise ShardError(f"{self.root}: store holds identity {found}, asked to open it with identity "
                                     f"{wanted}; use another directory or the same generator/sampler settings")
            else:
                atomic_write_json(self.root / MANIFEST_NAME, {"format": FORMAT, "identity": identity,
                                                              "identity_hash": wanted, "shards": {}})
        return self

    def path(self, first_seed: int, last_seed: int) -> Path:
        return self.root / shard_name(first_seed, last_seed)

    def write_shard(self, first_seed: int, last_seed: int,
                    columns: Mapping[str, np.ndarray] | pa.Table) -> dict:
        """Validate, write atomically, then record; returns the manifest entry. Rewriting a range replaces it."""
        _check_range(first_seed, last_seed)
        first_seed, last_seed = int(first_seed), int(last_seed)  # numpy ints would reach JSON as strings
        name, manifest = shard_name(first_seed, last_seed), self.manifest
        table = build_table(columns, first_seed, last_seed)
        _check_fits(manifest, name, first_seed, last_seed, table.column_names)
        table = table.replace_schema_metadata({_META_IDENTITY: canonical_json(manifest["identity"]),
                                               _META_HASH: manifest["identity_hash"]})
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            write_shard_file(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            entry = {"first_seed": first_seed, "last_seed": last_seed, "rows": table.num_rows,
                     "sha256": sha256_file(tmp), "bytes": os.path.getsize(tmp), "columns": table.column_names}
            # Rename and record under the lock, so racing writers of one range leave file and entry in agreement.
            with _manifest_lock(self.root):
                manifest = self.manifest
                _check_fits(manifest, name, first_seed, last_seed, table.column_names)
                os.replace(tmp, self.root / name)
                _fsync_dir(self.root)
                manifest["shards"][name] = entry
                atomic_write_json(self.root / MANIFEST_NAME, manifest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return entry

    def has_shard(self, first_seed: int, last_seed: int) -> bool:
        """Recorded in the manifest and present on disk with the recorded size."""
        return self._present(self.manifest, first_seed, last_seed)

    def _present(self, manifest: dict, first_seed: int, last_seed: int) -> bool:
        _check_range(first_seed, last_seed)
        entry = manifest["shards"].get(shard_name(first_seed, last_seed))
        path = self.path(first_seed, last_seed)
        return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]

    def missing(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (first, last) ranges still to write (for resume), in the order given."""
        manifest = self.manifest
        return [(int(a), int(b)) for a, b in ranges if not self._present(manifest, a, b)]

    def shard_paths(self) -> list[Path]:
        """Paths of the recorded shards in seed order."""
        return [self.root / name for name, _ in _sorted_entries(self.manifest)]


def temp_files(root: str | os.PathLike) -> list[Path]:
    """Hidden `.…tmp` files left by writers that crashed (or that are writing right now)."""
    return sorted(p for p in Path(root).glob(".*.tmp") if p.is_file())


def remove_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete leftover temp files; only safe while no writer is running on the store."""
    found = temp_files(root)
    for p in found:
        p.unlink(missing_ok=True)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Readers.

def _integrity_problem(path: Path, data: bytes, entry: dict) -> str | None:
    """Compare a shard's bytes with its manifest entry; a one-line problem naming the file, or None."""
    if len(data) != entry["bytes"]:
        return f"{path}: size {len(data)} bytes != manifest {entry['bytes']} (truncated or rewritten)"
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        return f"{path}: sha256 {digest[:16]}… != manifest {entry['sha256'][:16]}… (corrupted)"
    return None


def _read_verified(path: Path, entry: dict) -> pa.Buffer:
    """The shard's bytes, read once and checked against the manifest before anyone parses them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    problem = _integrity_problem(path, data, entry)
    if problem:
        raise ShardError(f"{problem}; run `raylab data verify {path.parent}`")
    return pa.py_buffer(data)


def _check_request(manifest: dict, columns: list[str] | None, rows: Mapping | None) -> list[str]:
    entries = _sorted_entries(manifest)
    available = entries[0][1]["columns"] if entries else list(REQUIRED_COLUMNS)
    wanted = list(available) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ShardError(f"columns {unknown} not in the store; available: {available}")
    extra = set(rows or {}) - set(manifest["shards"])
    if extra:
        raise ShardError(f"row selection names shards not in the store: {sorted(extra)}")
    return wanted


def _take(table: pa.Table, name: str, idx: np.ndarray) -> pa.Table:
    idx = np.asarray(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ShardError(f"row selection for {name}: expected a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= table.num_rows):
        raise ShardError(f"row selection for {name}: indices must lie in [0, {table.num_rows}), "
                         f"got [{idx.min()}, {idx.max()}]")
    return table.take(pa.array(idx.astype(np.int64, copy=False)))


def read_table(root: str | os.PathLike, columns: list[str] | None = None, verify: bool = True,
               rows: Mapping[str, np.ndarray] | None = None) -> pa.Table:
    """All shards (or the `rows` of the shards named in `rows`) in seed order as one table.

    verify=True reads every byte of each shard once, hashes it and parses those same bytes, even when only a
    few columns are asked for: a store is only trusted as a whole.
    """
    root = Path(root)
    manifest = load_manifest(root)
    wanted = _check_request(manifest, columns, rows)
    tables = []
    for name, entry in _sorted_entries(manifest):
        if rows is not None and name not in rows:
            continue
        path = root / name
        source = _read_verified(path, entry) if verify else path
        table = pq.read_table(pa.BufferReader(source) if verify else source, columns=wanted)
        tables.append(table if rows is None else _take(table, name, rows[name]))
    if not tables:
        return shard_schema(REQUIRED_COLUMNS).empty_table().select(wanted)
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)


def read_numpy(root: str | os.PathLike, columns: list[str] | None = None, verify: bool = True,
               rows: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Like `read_table`, as numpy arrays; `image` may be a read-only zero-copy view (copy before writing)."""
    return table_to_numpy(read_table(root, columns=columns, verify=verify, rows=rows))


def ray_read_parquet(paths: list[str], columns: list[str] | None = None):
    """`ray.data.read_parquet` on known files through Ray Data's V1 Parquet datasource.

    Ray 2.60's default V2 datasource starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS (32) footer-reading actors, each a
    fresh worker process, on every execution: on the 2-core dev box one read of a 10-row file took 17–38 s (and
    2.4–3 s with the variable set to 1) against 0.5–0.9 s through V1. We already know every file and its size from
    the manifest, so the footer actors buy nothing. The flag is read when the dataset is planned, here.
    """
    import ray.data  # lazily: the store itself must not need Ray

    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(list(paths), columns=columns)
    finally:
        ctx.use_datasource_v2 = saved


def read_dataset(root: str | os.PathLike, columns: list[str] | None = None, verify: bool = True):
    """A Ray Dataset over the manifest's shards (files verified here, in the driver, before Ray reads them)."""
    import ray.data

    root = Path(root)
    manifest = load_manifest(root)
    wanted = _check_request(manifest, columns, None)
    entries = _sorted_entries(manifest)
    if verify:
        for name, entry in entries:
            _read_verified(root / name, entry)
    if not entries:
        return ray.data.from_arrow(shard_schema(REQUIRED_COLUMNS).empty_table().select(wanted))
    return ray_read_parquet([str(root / name) for name, _ in entries], columns=wanted)


# ---------------------------------------------------------------------------------------------------------------
# Whole-store verification.

def _content_problems(path: Path, data: bytes, entry: dict, store_hash: str) -> list[str]:
    """Parse a shard and compare schema, rows, seeds and identity with its manifest entry."""
    try:
        table = pq.read_table(pa.BufferReader(data), columns=["seed"])
        schema = pq.ParquetFile(pa.BufferReader(data)).schema_arrow
    except (pa.ArrowException, OSError, KeyError) as err:
        return [f"{path}: unreadable or truncated Parquet ({str(err).splitlines()[0]})"]
    problems = []
    expected = shard_schema(entry["columns"])
    if not schema.remove_metadata().equals(expected) or expected.names != entry["columns"]:
        problems.append(f"{path}: schema {schema.remove_metadata().to_string()!r} != expected "
                        f"{expected.to_string()!r}".replace("\n", "; "))
    if table.num_rows != entry["rows"]:
        problems.append(f"{path}: {table.num_rows} rows != manifest {entry['rows']}")
    seeds = table.column("seed").to_numpy()
    if seeds.size and (seeds.min() < entry["first_seed"] or seeds.max() > entry["last_seed"]):
        problems.append(f"{path}: seeds [{seeds.min()}, {seeds.max()}] outside the shard's range "
                        f"[{entry['first_seed']}, {entry['last_seed']}]")
    file_hash = (schema.metadata or {}).get(_META_HASH, b"").decode()
    if file_hash != store_hash:
        problems.append(f"{path}: written for identity {file_hash or '(none)'}, store identity is {store_hash}")
    return problems


def _shard_problems(root: Path, name: str, entry: dict, store_hash: str) -> list[str]:
    path = root / name
    match = _SHARD_RE.match(name)
    if not match or (int(match[1]), int(match[2])) != (entry["first_seed"], entry["last_seed"]):
        return [f"{path}: manifest entry's seed range ({entry['first_seed']}, {entry['last_seed']}) does not "
                f"match the file name"]
    if not path.is_file():
        return [f"{path}: shard listed in the manifest is missing"]
    data = path.read_bytes()
    integrity = _integrity_problem(path, data, entry)
    return ([integrity] if integrity else []) + _content_problems(path, data, entry, store_hash)


def _stray_problems(root: Path, manifest: dict) -> list[str]:
    orphans = [p for p in sorted(root.iterdir()) if _SHARD_RE.match(p.name) and p.name not in manifest["shards"]]
    return ([f"{p}: shard file not in the manifest (orphan)" for p in orphans]
            + [f"{p}: leftover temp file from an interrupted write" for p in temp_files(root)])


def verify_store(root: str | os.PathLike) -> list[str]:
    """Every problem of a store, one line each naming the file; an empty list means the store is sound."""
    root = Path(root)
    try:
        manifest = load_manifest(root)
    except ShardError as err:
        return [str(err)]
    problems = []
    if identity_hash(manifest["identity"]) != manifest["identity_hash"]:
        problems.append(f"{root / MANIFEST_NAME}: identity_hash {manifest['identity_hash']} does not match "
                        f"its identity ({identity_hash(manifest['identity'])})")
    for name, entry in _sorted_entries(manifest):
        problems += _shard_problems(root, name, entry, manifest["identity_hash"])
    return problems + _stray_problems(root, manifest)
