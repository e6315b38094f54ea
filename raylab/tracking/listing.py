"""`raylab runs [--sweeps]`: recent runs or sweeps of the experiment, one line each, with their key metrics and
the name `raylab report` takes."""
from __future__ import annotations

import time
from typing import Any

from raylab.config import TrackingConfig
from raylab.tracking.mlflow_store import client_for, resolve_tracking_uri

KEY_PREFIXES = ("eval_clean_acc", "eval_pgd", "eval_aa_", "best_epoch", "fd_scorer_features")


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "?"


def _metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in sorted(metrics) if k.startswith(KEY_PREFIXES) and "_after_" not in k
            and "num_test" not in k]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)


def _recent(cfg: TrackingConfig, filter_string: str, limit: int) -> list[Any]:
    uri = resolve_tracking_uri(cfg)
    client = client_for(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        raise ValueError(f"experiment {cfg.experiment!r} not found in {uri}: nothing has run under this root yet")
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=limit,
                                   order_by=["attributes.start_time DESC"]))


def list_runs(cfg: TrackingConfig, sweeps: bool = False, limit: int = 20) -> list[str]:
    """Newest first. Sweeps: report name, status, trials, start, parent run id. Runs: name, stage, status, key
    metrics, run id (and the sweep a trial belongs to)."""
    if sweeps:
        lines = []
        for run in _recent(cfg, "tags.`raylab.stage` = 'sweep'", limit):
            trials = len(client_for(resolve_tracking_uri(cfg)).search_runs(
                [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`raylab.stage` = 'train'",
                max_results=1000))
            lines.append(f"{run.data.tags.get('raylab.sweep', run.info.run_name)}  {run.info.status}  "
                         f"{trials} trials  {_when(run.info.start_time)}  keys={run.data.tags.get('raylab.sweep_keys')}"
                         f"  run {run.info.run_id}   (raylab report {run.data.tags.get('raylab.sweep', '?')})")
        return lines or ["no sweeps yet"]
    lines = []
    for run in _recent(cfg, "", limit):
        tags = run.data.tags
        sweep = f"  sweep {tags['raylab.sweep']}" if "raylab.sweep" in tags and tags.get("raylab.stage") != "sweep" else ""
        lines.append(f"{run.info.run_name}  [{tags.get('raylab.stage', '?')}]  {run.info.status}  "
                     f"{_when(run.info.start_time)}  {_metrics(run.data.metrics)}  run {run.info.run_id}{sweep}")
    return lines or ["no runs yet"]
