"""Shard store verification: `verify_store` lists every problem of a store (manifest, shard bytes against the
manifest, Parquet schema / rows / seeds / identity, orphan and temp files), one line each naming the file.
`verify_once` is what readers call: the sha256 of a shard is taken once per version of the file (its size and
mtime, recorded in the manifest entry as `verified_mtime_ns`), not at every start (154 GB at the reference's 50M
set); the Parquet page checksums catch damage after that when the pages are read (`shards.read_parquet`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data.shard_format import ShardError, shard_schema
from raylab.data.shard_layout import (_META_HASH, _SHARD_RE, MANIFEST_NAME, _manifest_lock, _sorted_entries,
                                      identity_hash, load_manifest, temp_files, write_manifest)
from raylab.io import sha256_file


def _integrity_problem(path: Path, data: bytes, entry: dict) -> str | None:
    """Compare a shard's bytes with its manifest entry; a one-line problem naming the file, or None."""
    if len(data) != entry["bytes"]:
        return f"{path}: size {len(data)} bytes != manifest {entry['bytes']} (truncated or rewritten)"
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        return f"{path}: sha256 {digest[:16]}… != manifest {entry['sha256'][:16]}… (corrupted)"
    return None


def verify_once(root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Check the named shards against the manifest: a file whose size and mtime are those its entry was verified
    at passes on a stat; any other is hashed, and recorded verified when it matches. One ShardError naming the
    first file that is missing or differs. Returns the names hashed now."""
    root = Path(root)
    entries = load_manifest(root)["shards"]
    fresh: dict[str, tuple[int, str]] = {}
    for name in names:
        path, entry = root / name, entries.get(name)
        if entry is None:
            raise ShardError(f"{path}: shard named by the reader is not in the store's manifest")
        try:
            before = path.stat()
        except FileNotFoundError:
            raise ShardError(f"{path}: shard listed in the manifest is missing") from None
        if before.st_size == entry["bytes"] and entry.get("verified_mtime_ns") == before.st_mtime_ns:
            continue
        problem = _file_problem(path, before.st_size, entry)
        if problem:
            raise ShardError(f"{problem}; run `raylab data verify {root}`")
        if path.stat().st_mtime_ns == before.st_mtime_ns:  # not rewritten while we hashed it
            fresh[name] = (before.st_mtime_ns, entry["sha256"])
    if fresh:
        _record_verified(root, fresh)
    return list(fresh)


def _file_problem(path: Path, size: int, entry: dict) -> str | None:
    """`_integrity_problem` of a file hashed in chunks (never held whole)."""
    if size != entry["bytes"]:
        return f"{path}: size {size} bytes != manifest {entry['bytes']} (truncated or rewritten)"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"{path}: sha256 {digest[:16]}… != manifest {entry['sha256'][:16]}… (corrupted)"
    return None


def _record_verified(root: Path, fresh: dict[str, tuple[int, str]]) -> None:
    """Record the verified mtimes, for entries still holding the hash just checked. A store we may not write
    (read-only mount) is verified again next time instead."""
    try:
        with _manifest_lock(root):
            manifest = load_manifest(root)
            for name, (mtime, digest) in fresh.items():
                entry = manifest["shards"].get(name)
                if entry is not None and entry["sha256"] == digest:
                    entry["verified_mtime_ns"] = mtime
            write_manifest(root, manifest)
    except PermissionError:
        return


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
