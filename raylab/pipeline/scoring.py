"""Scoring a generated store with a classifier, the one home of the scoring pass: `score_store` (a Ray Data job
over the store's shards, cached beside them as `scores/<sha16>.npz`) and `second_scores`, the second scorer of
select.policy=agreement (Sehwag et al. 2022 §3.3.1). `raylab select`, sweeps (raylab.tune.artifacts) and the
generation job import it from here; it imports the selection room, never the other way round.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from raylab.cluster import init_ray, root_token
from raylab.config import ExperimentConfig
from raylab.data.shard_layout import load_manifest
from raylab.pipeline.actors import _DTYPES, ShardScorerActor
from raylab.pipeline.generators import GenerateError
from raylab.pipeline.pools import actor_pool, stage_resources
from raylab.pipeline.quality import scorer_identity
from raylab.pipeline.select import check_second, load_scores, save_scores, scores_path



def _scores_current(path: Path, manifest: dict) -> bool:
    """A cached scores file made for this store identity and covering all of its rows (a resumed store grows)."""
    if not path.is_file():
        return False
    meta, cols = load_scores(path)
    return (meta.get("identity_hash") == manifest["identity_hash"]
            and len(cols["seed"]) == sum(e["rows"] for e in manifest["shards"].values()))


def score_store(cfg: ExperimentConfig, store: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Score every image of `store` with the classifier at `checkpoint`; the result is cached as
    `store/scores/<sha16>.npz` (seed, score, pred, confidence) and reused when present."""
    import ray.data

    store = Path(store).resolve()
    manifest = load_manifest(store)
    scorer = scorer_identity(checkpoint)
    path = scores_path(store, scorer["sha256"])
    if _scores_current(path, manifest):
        return path
    entries = [{"name": n, "rows": e["rows"]} for n, e in manifest["shards"].items()]
    if not entries:
        raise GenerateError(f"{store}: the store has no shards to score")
    res = cfg.resources
    init_ray(shared_root=cfg.tracking.root)
    kwargs = {"store": str(store), "scorer": scorer, "use_gpu": stage_resources(res, "scorer").use_gpu,
              "root": root_token(cfg.tracking.root)}
    ds = actor_pool(ray.data.from_items(entries, override_num_blocks=len(entries)), ShardScorerActor, kwargs, "scorer",
               res, "numpy")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seed", "score", "pred", "confidence")}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            cols[k].append(batch[k])
    merged = {k: np.concatenate(v).astype(_DTYPES[k]) for k, v in cols.items()}
    meta = {"identity_hash": manifest["identity_hash"], "scorer": {k: v for k, v in scorer.items() if k != "file"}}
    return save_scores(path, merged, meta)


def second_scores(cfg: ExperimentConfig, store: str | os.PathLike) -> Optional[Path]:
    """The second scorer's scores file of `store` for select.policy=agreement (scored with
    select.second_checkpoint on Ray once, then reused from the cache beside the shards); None for other policies.
    Pass it to `build_view(..., second=...)`."""
    check_second(cfg.select)
    if cfg.select.policy != "agreement":
        return None
    return score_store(cfg, store, cfg.select.second_checkpoint)
