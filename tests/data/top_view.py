"""A top-k view of a store that has no scores (imported sets of constant images): the real per-class top-fraction
selection over seeded random scores, so the kept rows are scattered over every row group as a scorer's are
(tests/data/test_at_scale.py, bench/bench_data_50m.py)."""
from __future__ import annotations

import os

import numpy as np

from raylab.data.shard_layout import load_manifest
from raylab.pipeline.select import VIEW_FORMAT, View, store_columns, top_fraction_per_class, write_view


def write_top_view(store: str | os.PathLike, out: str | os.PathLike, fraction: float = 0.2, seed: int = 0) -> View:
    """The top `fraction` of every class of `store` by a seeded random score, written as a view at `out`."""
    cols, names, counts = store_columns(store)
    score = np.random.default_rng(seed).random(len(cols["seed"])).astype(np.float32)
    keep = np.flatnonzero(top_fraction_per_class(cols["label"], score, cols["seed"], fraction))
    shard = np.repeat(np.arange(len(names), dtype=np.int32), counts)[keep]
    row = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))[keep].astype(np.int32)
    meta = {"format": VIEW_FORMAT, "store": str(os.path.abspath(store)), "policy": "topk",
            "identity_hash": load_manifest(store)["identity_hash"], "store_rows": int(counts.sum()),
            "rows": len(keep), "shards": names, "amount": 0, "select": {"top_fraction": fraction, "scores": "random"}}
    return write_view(View(None, meta, cols["seed"][keep], cols["label"][keep].astype(np.int16), shard, row,
                           score[keep]), out)
