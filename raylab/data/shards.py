"""Generated-data shard store: Parquet shards of 32×32×3 images, one per fixed seed range, plus a manifest.

Layout of a store directory (DESIGN.md, "Data contracts")::

    manifest.json                       identity + one entry per shard (seed range, rows, sha256, bytes, columns)
    gen-0000000000-0000009999.parquet   seeds 0..9999 inclusive
    gen-0000010000-0000019999.parquet
    .manifest.lock                      lock file (raylab.io.exclusive): the manifest is rewritten under it

Columns: `image` (3072 raw HWC uint8 bytes), `label` int16, `seed` int64, `class_cond` int16 (−1 when
unconditional), and after scoring `score` float32, `pred` int16, `confidence` float32. The generator / sampler /
scorer identity lives once in the manifest and in each file's key-value metadata, never per row. Every shard of
a store has the same columns (recorded per entry, enforced on write), so shards always concatenate.

Crash safety: a shard is written to a hidden temp file in the same directory, fsynced, renamed into place, and
only then recorded in the manifest, so a shard listed in the manifest is always complete. Readers check every file
against the manifest (size + sha256) before using it, once per version of the file: the manifest records the size
and mtime each entry was verified at (`shard_verify.verify_once`), and Parquet page checksums catch later damage as
the pages are read. `verify_store` hashes and parses everything and lists every problem of a store.

The shard API is split by concern; this module is the store (`ShardStore`, the writer) and its verified readers;
the rest lives in its own home module (import from there):

- `raylab.data.shard_format`: `ShardError`, the column schema, image encoding/decoding, `build_table`;
- `raylab.data.shard_layout`: shard file names, the manifest (load, lock), identity hashing, temp files;
- `raylab.data.shard_verify`: `verify_store`.
"""
from __future__ import annotations

import bisect
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data.shard_format import REQUIRED_COLUMNS, ShardError, build_table, shard_schema, table_to_numpy
from raylab.data.shard_layout import (_MAX_SEED, _META_HASH, _META_IDENTITY, FORMAT, MANIFEST_NAME, _manifest_lock,
                                      _sorted_entries, canonical_json, identity_hash, load_manifest, shard_name,
                                      write_manifest)
from raylab.data.shard_verify import verify_once
from raylab.io import mkstemp_umask, sha256_file

CORRUPT_DIR = "corrupt"  # shards a rerun found corrupted, kept for inspection
# Rows per Parquet row group: a rank reads whole row groups, only those holding its rows, so what it reads beyond its
# own rows is about two row groups per window of the pass (raylab.data.mix): <= 2x its rows up to 64 ranks with
# 128 rows (393 KB of images). A 10,000-row shard of random images: 31.8 MB vs 30.9 MB as one row group, read whole
# in 11 vs 10 ms, its label column in 1.7 vs 0.4 ms (2-core dev box, median of 3).
ROW_GROUP_ROWS = 128
RECORD_EVERY = 64  # shards written between two manifest rewrites by `write_shards` (the importer)
WRITERS = 2  # shards `write_shards` writes at once: the dev box's 2 cores


# ---------------------------------------------------------------------------------------------------------------
# Writing a shard.

def _check_range(first_seed: int, last_seed: int) -> None:
    ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in (first_seed, last_seed))
    if not ok or not 0 <= first_seed <= last_seed <= _MAX_SEED:
        raise ShardError(f"seed range ({first_seed!r}, {last_seed!r}) must be integers with "
                         f"0 <= first <= last <= {_MAX_SEED}")


def _check_fits(manifest: dict, new: list[tuple[str, int, int, list[str]]]) -> None:
    """New shards (name, first, last, columns) must not overlap another range (of the store or of each other) and
    must have the store's column set. Sorted ranges and one bisect each: at 5,000 shards a scan per shard was
    quadratic over an import."""
    others = sorted((e["first_seed"], e["last_seed"], name, e["columns"]) for name, e in manifest["shards"].items()
                    if name not in {n for n, *_ in new})
    firsts = [o[0] for o in others]
    for name, first, last, columns in new:
        if others and others[0][3] != columns:
            raise ShardError(f"shard {name} has columns {columns} but the store's shards have {others[0][3]}")
        at = bisect.bisect_right(firsts, last)  # the last recorded range starting at or before `last`
        if at and others[at - 1][1] >= first:
            raise ShardError(f"shard {name} overlaps {others[at - 1][2]} already in the store")
    ranges = sorted((first, last, name) for name, first, last, _ in new)
    for (_, last, name), (first, _, other) in zip(ranges, ranges[1:]):
        if first <= last:
            raise ShardError(f"shard {other} overlaps {name} written with it")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard_file(table: pa.Table, path: str | os.PathLike) -> None:
    """Write one shard table to Parquet with the options every shard uses (the bench reuses them)."""
    # Dictionary encoding is useless on unique 3072-byte images, so only the small int columns get it; snappy as
    # everywhere else in Parquet land. Row groups of ROW_GROUP_ROWS: a training rank reads whole row groups, only
    # those holding its rows (raylab.data.mix). Page checksums: a reader detects a damaged page when it reads it,
    # so no start has to hash the shards again (`shard_verify.verify_once`).
    small = [c for c in table.column_names if c != "image"]
    pq.write_table(table, path, use_dictionary=small, compression="snappy", row_group_size=ROW_GROUP_ROWS,
                   write_page_checksum=True)


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
                write_manifest(self.root, {"format": FORMAT, "identity": identity, "identity_hash": wanted,
                                           "shards": {}})
        return self

    def path(self, first_seed: int, last_seed: int) -> Path:
        return self.root / shard_name(first_seed, last_seed)

    def write_shard(self, first_seed: int, last_seed: int,
                    columns: Mapping[str, np.ndarray] | pa.Table) -> dict:
        """Validate, write atomically, then record; returns the manifest entry. Rewriting a range replaces it."""
        return self._record([self._write_file(first_seed, last_seed, columns)])[0]

    def write_shards(self, shards: Iterable[tuple[int, int, Mapping[str, np.ndarray] | pa.Table]],
                     every: int = RECORD_EVERY, writers: int = WRITERS) -> int:
        """`write_shard` for many shards, `writers` at a time (encoding, hashing and fsync release the GIL), recorded
        in the manifest `every` shards at a time (one manifest read and rewrite per batch, not per shard: 1.5 MB of
        JSON at the importer's 5,000 shards). A crash leaves the unrecorded ones as temp files, written again by a
        rerun. Returns the number written."""
        manifest, pending, done = self.manifest, [], 0
        with ThreadPoolExecutor(writers, thread_name_prefix="shard-writer") as pool:
            flight: deque = deque()
            try:
                for first, last, columns in shards:
                    flight.append(pool.submit(self._write_file, first, last, columns, manifest))
                    while len(flight) >= writers or (flight and flight[0].done()):
                        pending.append(flight.popleft().result())
                    if len(pending) >= every:
                        done, pending, manifest = done + len(self._record(pending)), [], self.manifest
                while flight:
                    pending.append(flight.popleft().result())
                done += len(self._record(pending)) if pending else 0
                pending = []
            finally:
                pending += [f.result() for f in flight if not f.cancel() and f.exception() is None]
                for *_, tmp in pending:
                    Path(tmp).unlink(missing_ok=True)
        return done

    def _write_file(self, first_seed: int, last_seed: int, columns: Mapping[str, np.ndarray] | pa.Table,
                    manifest: dict | None = None) -> tuple[str, dict, str]:
        """Validate and write one shard to a temp file beside its place: (name, entry, temp path). `manifest`: a
        recent copy to check against (`_record` checks again under the lock)."""
        _check_range(first_seed, last_seed)
        first_seed, last_seed = int(first_seed), int(last_seed)  # numpy ints would reach JSON as strings
        name, manifest = shard_name(first_seed, last_seed), manifest or self.manifest
        table = build_table(columns, first_seed, last_seed)
        _check_fits(manifest, [(name, first_seed, last_seed, table.column_names)])
        table = table.replace_schema_metadata({_META_IDENTITY: canonical_json(manifest["identity"]),
                                               _META_HASH: manifest["identity_hash"]})
        fd, tmp = mkstemp_umask(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            write_shard_file(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            entry = {"first_seed": first_seed, "last_seed": last_seed, "rows": table.num_rows,
                     "sha256": sha256_file(tmp), "bytes": os.path.getsize(tmp), "columns": table.column_names,
                     "row_group_rows": ROW_GROUP_ROWS}
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name, entry, tmp

    def _record(self, written: list[tuple[str, dict, str]]) -> list[dict]:
        """Rename written shards into place and record them, under the lock, so racing writers of one range leave
        file and entry in agreement. The sha256 was taken of these very bytes, so each entry is recorded verified
        at the file's size and mtime (`shard_verify.verify_once`)."""
        try:
            with _manifest_lock(self.root):
                manifest = self.manifest
                _check_fits(manifest, [(n, e["first_seed"], e["last_seed"], e["columns"]) for n, e, _ in written])
                for name, entry, tmp in written:
                    os.replace(tmp, self.root / name)
                    entry["verified_mtime_ns"] = (self.root / name).stat().st_mtime_ns
                    manifest["shards"][name] = entry
                _fsync_dir(self.root)
                write_manifest(self.root, manifest)
        finally:
            for *_, tmp in written:
                Path(tmp).unlink(missing_ok=True)
        return [entry for _, entry, _ in written]

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

    def set_aside_corrupt(self, ranges: Iterable[tuple[int, int]]) -> list[str]:
        """Check every present shard of `ranges` against its manifest sha256; move each one that differs to
        `corrupt/` (kept, never deleted) and drop its entry, so it is written again. One line per shard moved."""
        lines = []
        for a, b in ranges:
            path, entry = self.path(a, b), self.manifest["shards"].get(shard_name(a, b))
            if entry is None or not path.is_file() or sha256_file(path) == entry["sha256"]:
                continue
            aside = self.root / CORRUPT_DIR / f"{path.name}.{os.getpid()}.{time.time_ns()}"
            aside.parent.mkdir(exist_ok=True)
            with _manifest_lock(self.root):
                manifest = self.manifest
                os.replace(path, aside)
                manifest["shards"].pop(path.name, None)
                write_manifest(self.root, manifest)
            lines.append(f"{path}: sha256 differs from the manifest (corrupted); set aside as {aside}, "
                         "writing it again")
        return lines

    def shard_paths(self) -> list[Path]:
        """Paths of the recorded shards in seed order."""
        return [self.root / name for name, _ in _sorted_entries(self.manifest)]


# ---------------------------------------------------------------------------------------------------------------
# Readers.

def read_parquet(path: str | os.PathLike, columns: list[str] | None = None,
                 row_groups: list[int] | None = None) -> pa.Table:
    """One shard's columns (all its row groups, or `row_groups`), every page checked against its checksum as it
    is read (shards written before the checksums have none to check): a damaged page is one ShardError naming the
    file, never silently wrong pixels."""
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as f:
            return f.read(columns=columns) if row_groups is None else f.read_row_groups(row_groups, columns=columns)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{path}: unreadable or damaged Parquet ({str(err).splitlines()[0]}); run `raylab data "
                         f"verify {Path(path).parent}`") from None


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

    verify=True checks each shard read against the manifest first (its sha256, taken once per file version:
    `shard_verify.verify_once`), whatever columns are asked for; every read checks the pages' checksums.
    """
    root = Path(root)
    manifest = load_manifest(root)
    wanted = _check_request(manifest, columns, rows)
    names = [name for name, _ in _sorted_entries(manifest) if rows is None or name in rows]
    if verify:
        verify_once(root, names)
    tables = []
    for name in names:
        table = read_parquet(root / name, columns=wanted)
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
    """A Ray Dataset over the manifest's shards (files verified here, in the driver, before Ray reads them: once
    per file version, `shard_verify.verify_once`)."""
    import ray.data

    root = Path(root)
    manifest = load_manifest(root)
    wanted = _check_request(manifest, columns, None)
    entries = _sorted_entries(manifest)
    if verify:
        verify_once(root, [name for name, _ in entries])
    if not entries:
        return ray.data.from_arrow(shard_schema(REQUIRED_COLUMNS).empty_table().select(wanted))
    return ray_read_parquet([str(root / name) for name, _ in entries], columns=wanted)
