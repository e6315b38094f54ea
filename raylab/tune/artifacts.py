"""Content-addressed artifacts shared by trials and sweeps: a generated set and its selected view.

An artifact's directory is named by the hash of exactly the config keys that produce it, so a beta or epochs
sweep generates once, a steps sweep once per step count, and an amount sweep draws every amount as a balanced
per-class prefix of one generation (Wang et al. 2023 Table 5). Two trials that need the same artifact at the same
moment do not both build it: the builder holds an exclusive file lock, and the second finds the finished artifact.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from raylab.config import ExperimentConfig, fingerprint
from raylab.io import atomic_write_json
from raylab.runs import GENERATION_KEYS

VIEW_KEYS = GENERATION_KEYS + ["select"]


@dataclass(frozen=True)
class GeneratedView:
    """A selected view over a generated set, ready for training."""
    view_path: Path
    store: Path
    identity_hash: str
    rows: int
    fd: float | None  # Frechet distance on scorer features, when the generation measured it


def artifacts_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.tracking.root).resolve() / "artifacts"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a small lock file) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _generate(cfg: ExperimentConfig, parent_run_id: str | None) -> dict:
    """The generated set of `cfg` (built or resumed under its lock); its summary is cached beside it."""
    from raylab.pipeline.generate_job import run_generate

    folder = artifacts_root(cfg) / f"generate-{fingerprint(cfg, GENERATION_KEYS)}"
    summary_path = folder / "generate.json"
    with exclusive(folder.with_suffix(".lock")):
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        outcome = run_generate(cfg, folder / "shards", parent_run_id=parent_run_id)
        summary = {"store": str(outcome.store), "identity_hash": outcome.identity_hash,
                   "mlflow_run_id": outcome.mlflow_run_id, "fd": _logged_fd(cfg, outcome.mlflow_run_id)}
        atomic_write_json(summary_path, summary)
        return summary


def _logged_fd(cfg: ExperimentConfig, run_id: str | None) -> float | None:
    if run_id is None:
        return None
    from raylab.tracking import get_run, resolve_tracking_uri

    metrics = get_run(resolve_tracking_uri(cfg.tracking), run_id).metrics
    return next((v for k, v in metrics.items() if k.startswith("fd")), None)


def ensure_view(cfg: ExperimentConfig, parent_run_id: str | None = None) -> GeneratedView:
    """Generate (once) and select (once) what `cfg` trains on."""
    from raylab.pipeline.select import build_view, load_view

    gen = _generate(cfg, parent_run_id)
    path = artifacts_root(cfg) / f"view-{fingerprint(cfg, VIEW_KEYS)}"
    with exclusive(path.with_suffix(".lock")):
        view = load_view(path) if (path / "view.json").exists() else build_view(gen["store"], cfg.select, path)
    return GeneratedView(path, Path(gen["store"]), gen["identity_hash"], len(view), gen.get("fd"))
