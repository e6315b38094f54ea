"""Shard store verification: `verify_store` lists every problem of a store (manifest, shard bytes against the
manifest, Parquet schema / rows / seeds / identity, orphan and temp files), one line each naming the file.
`_integrity_problem` (size + sha256 against the manifest entry) is shared with the verified readers in
`raylab.data.shards`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data.shard_format import ShardError, shard_schema
from raylab.data.shard_layout import (_META_HASH, _SHARD_RE, MANIFEST_NAME, _sorted_entries, identity_hash,
                                      load_manifest, temp_files)


def _integrity_problem(path: Path, data: bytes, entry: dict) -> str | None:
    """Compare a shard's bytes with its manifest entry; a one-line problem naming the file, or None."""
    if len(data) != entry["bytes"]:
        return f"{path}: size {len(data)} bytes != manifest {entry['bytes']} (truncated or rewritten)"
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        return f"{path}: sha256 {digest[:16]}… != manifest {entry['sha256'][:16]}… (corrupted)"
    return None


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
