"""A view or a whole store as a training input: its row index (`raylab.data.row_index`), stored once beside it,
and its lineage record, with a start-up of seconds whatever its size.

What a training start reads: view.json, the store's manifest, the index's index.json and one `stat` per shard
(`shard_verify.verify_once`: a shard is hashed once per version of the file, not at every start). A view that keeps
few of its store's rows is read from a compact copy of them beside it (`raylab.pipeline.compact`), written on its
first use, whose index is a whole store's. The index is built on first use, O(N) in chunks from the view's
rows.npz (its members memory-mapped, never loaded) or from a store's manifest alone; the driver then hands the
Train workers its path, never its rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylab.data.npz_import import npz_members
from raylab.data.row_index import RowIndex, ensure_index, store_blocks, view_blocks
from raylab.data.shard_format import ShardError
from raylab.data.shard_layout import _sorted_entries, load_manifest
from raylab.data.shard_verify import verify_once
from raylab.io import sha256_file
from raylab.pipeline.compact import compact_view, is_sparse
from raylab.pipeline.select import VIEW_META, VIEW_ROWS, SelectError, check_view_store, view_meta

INDEX_DIR = "index"  # beside view.json, or under a store for training on the whole store


def _is_view(path: Path) -> bool:
    return (path / VIEW_META).is_file() or path.name == VIEW_META


def open_generated(path: str | os.PathLike) -> RowIndex:
    """The rows training streams from a view directory or a whole shard store, their shards verified once."""
    path = Path(path)
    index = view_index(path) if _is_view(path) else store_index(path)
    store = Path(index.files[0]).parent if index.files else path
    try:
        verify_once(store, sorted({Path(index.files[f]).name for f in np.unique(index.blocks["file"])}))
    except ShardError as err:
        raise SelectError(str(err)) from None
    return index


def view_index(path: str | os.PathLike) -> RowIndex:
    """The row index of the view at `path`, built beside it on first use (and again if rows.npz changed); a
    sparse view's is its compact copy's, written on first use (`raylab.pipeline.compact`)."""
    folder, meta = view_meta(path)
    check_view_store(meta)
    if is_sparse(meta):
        return store_index(compact_view(folder))
    try:
        stat = (folder / VIEW_ROWS).stat()
    except FileNotFoundError:
        raise SelectError(f"{folder / VIEW_ROWS}: missing (torn write); rerun `raylab select`") from None
    check = {"rows_sha256": meta["rows_sha256"], "rows_bytes": stat.st_size, "rows_mtime_ns": stat.st_mtime_ns,
             "identity_hash": meta["identity_hash"]}
    return ensure_index(folder / INDEX_DIR, check, lambda: _build_view_index(folder, meta))


def _build_view_index(folder: Path, meta: dict) -> tuple[dict, np.ndarray, dict]:
    rows_file = folder / VIEW_ROWS
    if sha256_file(rows_file) != meta.get("rows_sha256"):  # once per version of rows.npz: the index records it
        raise SelectError(f"{rows_file}: does not match {VIEW_META} (torn write); rerun `raylab select`")
    entries = load_manifest(meta["store"])["shards"]
    missing = [n for n in meta["shards"] if n not in entries]
    if missing:
        raise SelectError(f"{Path(meta['store']) / missing[0]}: shard named by the view is missing from the store")
    cols = npz_members(rows_file, ("shard", "row", "label"))
    blocks = view_blocks([entries[n] for n in meta["shards"]], cols["shard"], cols["row"])
    info = {"store": meta["store"], "files": meta["shards"], "rows": len(cols["row"])}
    return info, blocks, {"row": (cols["row"], np.dtype(np.int32)), "label": (cols["label"], np.dtype(np.int16))}


def store_index(path: str | os.PathLike) -> RowIndex:
    """The row index of a whole store (every row, its own labels), from its manifest: under `<store>/index/`,
    keyed by the shards present (a store that gains shards gets another index)."""
    store = Path(path).resolve()
    try:
        manifest = load_manifest(store)
    except ShardError as err:
        raise SelectError(str(err)) from None
    entries = _sorted_entries(manifest)
    if not entries:
        raise SelectError(f"{store}: the store has no shards yet (run `raylab generate` first)")
    key = hashlib.sha256(json.dumps([manifest["identity_hash"], [
        (n, e["sha256"], e["rows"], e.get("row_group_rows")) for n, e in entries]]).encode()).hexdigest()

    def build() -> tuple[dict, np.ndarray, dict]:
        blocks = store_blocks([e for _, e in entries])
        return {"store": str(store), "files": [n for n, _ in entries], "rows": int(blocks["stored"].sum())}, blocks, {}
    return ensure_index(store / INDEX_DIR / key[:16], {"key": key}, build)


def generated_lineage(path: str | os.PathLike) -> dict[str, Any]:
    """What a run that trains on the view or store at `path` records as its `generated` input (keyword arguments
    of `Tracker.log_dataset_lineage`): the content identity (a view: its store's identity and the sha256 of its
    rows; a whole store: its identity and the sha256 of every shard present, so a store that gained shards since
    is another input), and the store and scorer it came from. Read from the view and manifest files alone."""
    path = Path(path)
    if _is_view(path):
        folder, meta = view_meta(path)
        check_view_store(meta)
        store, manifest = Path(meta["store"]), load_manifest(meta["store"])
        identity = hashlib.sha256(f"{meta['identity_hash']}:{meta['rows_sha256']}".encode()).hexdigest()
        extra = {"store": store, "policy": meta["policy"], "store_rows": meta["store_rows"]}
        rows, source = meta["rows"], folder
    else:
        store, manifest = path.resolve(), load_manifest(path)
        shards = sorted((name, e["sha256"]) for name, e in manifest["shards"].items())
        identity = hashlib.sha256(json.dumps([manifest["identity_hash"], shards]).encode()).hexdigest()
        rows, source = sum(e["rows"] for e in manifest["shards"].values()), store
        extra = {"store": store, "policy": "whole store"}
    scorer = (manifest.get("identity") or {}).get("scorer") or {}
    extra |= {"store_identity": manifest["identity_hash"],
              "scorer": scorer.get("sha256", "none") if isinstance(scorer, dict) else str(scorer)}
    return {"manifest_hash": identity, "name": "generated", "source_path": str(source), "num_rows": int(rows),
            "extra": extra}


@dataclass(frozen=True)
class GeneratedInput:
    """A view or whole store as a training input: the rows training streams (pickled as the index's path) and
    its lineage record."""
    rows: RowIndex
    lineage: dict[str, Any]

    def identities(self) -> dict[str, str]:
        """Its parts of a training run's identity (raylab.runs.STAGE_INPUTS), as its lineage records them."""
        return {"generated": self.lineage["manifest_hash"], "scorer": self.lineage["extra"]["scorer"]}


def generated_input(path: str | os.PathLike) -> GeneratedInput:
    """The view or store at `path`, files verified (`open_generated`), with its lineage (`generated_lineage`)."""
    return GeneratedInput(open_generated(path), generated_lineage(path))
