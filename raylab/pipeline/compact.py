"""A compact copy of a sparse view's rows: what training reads of a view that keeps few of its store's rows.

A training rank reads whole Parquet row groups (`raylab.data.mix`). The paper's default view keeps the top 20% of
every class, scattered over every row group of the store, so each row group read held ~1/5 of rows the rank used:
it read ~5x the rows it consumed. A view that keeps less than COMPACT_BELOW of its store's rows is therefore copied,
on its first use, into a shard store of its own beside it (`<view>/compact/`): the kept rows in the view's order,
COMPACT_SHARD_ROWS to a shard, with the view's labels (pseudo-labels included) as their `label` column; the same
shard format and page checksums as any store, each shard's sha256 in its manifest. Training then streams that
store as a whole (`raylab.pipeline.generated_input`).

The copy is derived data: the view's identity (its store's identity and the sha256 of rows.npz) is unchanged, and
the copy's own identity names them. It is written into `<view>/.compact.tmp/` shard by shard (each shard atomic,
so a rerun writes only the missing ones), renamed to `compact/` when whole, and only then recorded in view.json
(`compact`: its identity hash, rows, shards and a digest of its shards' hashes). Memory is bounded: one shard's
rows at a time, read from the source row groups holding them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from raylab.data.npz_import import npz_members
from raylab.data.shard_format import ShardError
from raylab.data.shard_layout import identity_hash, load_manifest
from raylab.data.shard_verify import verify_once
from raylab.data.shards import ShardStore, read_parquet
from raylab.io import atomic_write_json, exclusive, sha256_file
from raylab.pipeline.select import VIEW_META, VIEW_ROWS, SelectError, view_meta

COMPACT_DIR, COMPACT_TMP, COMPACT_LOCK = "compact", ".compact.tmp", ".compact.lock"
# Below half its store's rows, a view's reads of whole row groups are over 2x its rows (1/f at a fraction f).
COMPACT_BELOW = 0.5
COMPACT_SHARD_ROWS = 10_000  # as the importer's shards: 31 MB of images each
RECORD_EVERY = 4  # shards written between two manifest rewrites: what an interrupted copy can lose
SOURCE_COLUMNS = ["image", "seed", "class_cond"]


def is_sparse(meta: Mapping[str, Any]) -> bool:
    """Whether the view (its view.json) keeps so few of its store's rows that training reads a compact copy."""
    return meta["rows"] < COMPACT_BELOW * meta["store_rows"]


def compact_identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of the view's compact store: what it is a copy of, and how it is cut."""
    return {"compact_of": {"store_identity": meta["identity_hash"], "rows_sha256": meta["rows_sha256"]},
            "shard_rows": COMPACT_SHARD_ROWS}


def shards_digest(store: str | os.PathLike) -> str:
    """A digest of the store's shards (name, rows, sha256): what view.json records of its compact copy."""
    shards = sorted((n, e["rows"], e["sha256"]) for n, e in load_manifest(store)["shards"].items())
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def recorded_compact(folder: Path, meta: Mapping[str, Any]) -> Path | None:
    """The view's compact store if view.json records one that is whole and of this view's rows; else None."""
    record, path = meta.get("compact"), folder / COMPACT_DIR
    if not record or record.get("identity_hash") != identity_hash(compact_identity(meta)):
        return None
    try:
        found = load_manifest(path)
    except ShardError:
        return None
    if found["identity_hash"] != record["identity_hash"] or shards_digest(path) != record["shards_sha256"]:
        return None
    return path


def compact_view(path: str | os.PathLike) -> Path:
    """The compact store of the sparse view at `path`, written first if view.json records none (under a lock:
    concurrent trials of a sweep write it once)."""
    folder, meta = view_meta(path)
    found = recorded_compact(folder, meta)
    if found is not None:
        return found
    with exclusive(folder / COMPACT_LOCK):
        folder, meta = view_meta(folder)
        return recorded_compact(folder, meta) or _write_compact(folder, meta)


def _write_compact(folder: Path, meta: dict) -> Path:
    rows_file = folder / VIEW_ROWS
    if sha256_file(rows_file) != meta.get("rows_sha256"):
        raise SelectError(f"{rows_file}: does not match {VIEW_META} (torn write); rerun `raylab select`")
    cols = npz_members(rows_file, ("seed", "label", "shard", "row"))
    _check_seed_order(cols["seed"], rows_file)
    final = folder / COMPACT_DIR
    if final.exists() and not (folder / COMPACT_TMP).exists():  # renamed but not recorded, or stale: checked next
        os.rename(final, folder / COMPACT_TMP)
    tmp = _open_tmp(folder / COMPACT_TMP, compact_identity(meta))
    spans = compact_spans(len(cols["seed"]))
    ranges = [(int(cols["seed"][a]), int(cols["seed"][b - 1])) for a, b in spans]
    todo = set(tmp.missing(ranges))  # a rerun writes only the shards an interrupted one left out
    sources = _sources(meta, cols["shard"])
    tmp.write_shards(((first, last, _compact_table(sources, cols, a, b))
                      for (a, b), (first, last) in zip(spans, ranges) if (first, last) in todo), every=RECORD_EVERY)
    shutil.rmtree(final, ignore_errors=True)  # a copy of rows this view no longer has
    os.rename(tmp.root, final)
    record = {"dir": COMPACT_DIR, "identity_hash": identity_hash(compact_identity(meta)), "rows": len(cols["seed"]),
              "shards": len(spans), "shards_sha256": shards_digest(final)}
    atomic_write_json(folder / VIEW_META, meta | {"compact": record})
    return final


def compact_spans(rows: int) -> list[tuple[int, int]]:
    """[a, b) of the view's rows in each compact shard."""
    return [(a, min(a + COMPACT_SHARD_ROWS, rows)) for a in range(0, rows, COMPACT_SHARD_ROWS)]


def _check_seed_order(seed: np.ndarray, rows_file: Path, chunk: int = 1 << 22) -> None:
    """Compact shards are named by their seed range: the view's seeds must rise (views are kept in seed order)."""
    for a in range(0, len(seed), chunk):
        part = np.asarray(seed[max(a - 1, 0):a + chunk])
        if np.any(np.diff(part) <= 0):
            raise SelectError(f"{rows_file}: seeds are not in rising order; rerun `raylab select`")


def _open_tmp(root: Path, identity: dict) -> ShardStore:
    """The temp store of a compact copy, resumed when it is of the same identity, else started again."""
    try:
        return ShardStore(root).create_or_open(identity)
    except ShardError:  # a half-written copy of other rows (the view was selected again)
        shutil.rmtree(root)
        return ShardStore(root).create_or_open(identity)


def _sources(meta: Mapping[str, Any], shard: np.ndarray) -> list[tuple[Path, dict] | None]:
    """(path, manifest entry) of each shard the view names (None for those it keeps no row of), verified once."""
    store, names = Path(meta["store"]), meta["shards"]
    used = np.unique(shard).tolist()
    verify_once(store, [names[s] for s in used])
    entries = load_manifest(store)["shards"]
    out: list[tuple[Path, dict] | None] = [None] * len(names)
    for s in used:
        out[s] = (store / names[s], entries[names[s]])
    return out


def _compact_table(sources: list, cols: Mapping[str, np.ndarray], a: int, b: int) -> pa.Table:
    """The view's rows [a, b) as one shard table: images, seeds and class_cond from the row groups holding them,
    labels from the view."""
    shard, row = np.asarray(cols["shard"][a:b], np.int64), np.asarray(cols["row"][a:b], np.int64)
    cuts = np.flatnonzero(np.diff(shard)) + 1  # the view is in store order: each source shard is one run
    parts = [_rows_of(*sources[int(s[0])], r) for s, r in zip(np.split(shard, cuts), np.split(row, cuts))]
    table = pa.concat_tables(parts)
    return table.append_column("label", pa.array(np.asarray(cols["label"][a:b], np.int16)))


def _rows_of(path: Path, entry: Mapping[str, Any], rows: np.ndarray) -> pa.Table:
    """`rows` (ascending) of one shard, reading only the row groups holding them."""
    group = entry.get("row_group_rows") or max(entry["rows"], 1)
    groups = np.unique(rows // group)
    table = read_parquet(path, SOURCE_COLUMNS, row_groups=groups.tolist())
    sizes = np.minimum(group, entry["rows"] - groups * group)
    start = np.cumsum(sizes) - sizes  # where each group read begins in `table`
    where = np.searchsorted(groups, rows // group)
    return table.take(pa.array(start[where] + rows - groups[where] * group))
