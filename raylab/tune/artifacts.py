"""Content-addressed artifacts shared by trials and sweeps: a generated set and its selected view.

An artifact's directory is named by the hash of exactly the config keys that produce it, so a beta or epochs
sweep generates once, a steps sweep once per step count, and an amount sweep draws every amount as a balanced
per-class prefix of one generation (Wang et al. 2023 Table 5). Two trials that need the same artifact at the same
moment do not both build it: the builder holds an exclusive file lock, and the second finds the finished artifact.
Each artifact directory holds the resolved `config.json` of the trial that first asked for it.

select.policy=agreement scores the generated set a second time (select.second_checkpoint, cached beside the
shards) before selecting, exactly as `raylab select` does (`raylab.pipeline.select.second_scores`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raylab.config import ExperimentConfig, fingerprint
from raylab.io import atomic_write_json, exclusive
from raylab.pipeline.plan import IDENTITY_FORMAT
from raylab.runs import GENERATION_KEYS, write_config

VIEW_KEYS = GENERATION_KEYS + ["select"]


def address(cfg: ExperimentConfig, keys: list[str]) -> str:
    """Content address of an artifact: its config keys and the generated-set format, so a set laid out by an older
    raylab (class by class, format /1) is never reused for a newer one."""
    return f"{fingerprint(cfg, keys)}-{IDENTITY_FORMAT.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class GeneratedView:
    """A selected view over a generated set, ready for training."""
    view_path: Path
    store: Path
    identity_hash: str
    rows: int
    fd: float | None  # Frechet distance on scorer features, when the generation measured it
    device_s: float = 0.0  # the generation's measured device time (sampler + scorer busy)


def artifacts_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.tracking.root).resolve() / "artifacts"


def _generate(cfg: ExperimentConfig, parent_run_id: str | None) -> dict:
    """The generated set of `cfg` (built or resumed under its lock); its summary is cached beside it."""
    from raylab.pipeline.generate_job import run_generate

    folder = artifacts_root(cfg) / f"generate-{address(cfg, GENERATION_KEYS)}"
    summary_path = folder / "generate.json"
    with exclusive(folder.with_suffix(".lock")):
        write_config(folder, cfg, keep=True)
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        outcome = run_generate(cfg, folder / "shards", parent_run_id=parent_run_id)
        summary = {"store": str(outcome.store), "identity_hash": outcome.identity_hash,
                   "mlflow_run_id": outcome.mlflow_run_id, "quality": outcome.quality,
                   "fd": outcome.quality.get("fd_scorer_features"), "device_s": outcome.device_seconds}
        atomic_write_json(summary_path, summary)
        return summary


def check_view_inputs(cfg: ExperimentConfig) -> None:
    """What `ensure_view` refuses before it writes or runs anything: the generation job's inputs (dataset files,
    scorer with its stated architecture, Inception detector) and the agreement policy's second scorer. The sweep
    driver runs it for its arms before Tune starts."""
    from raylab.pipeline.generate_job import check_inputs
    from raylab.pipeline.quality import scorer_identity
    from raylab.pipeline.select import check_second

    check_second(cfg.select)
    check_inputs(cfg)
    if cfg.select.policy == "agreement":
        scorer_identity(cfg.select.second_checkpoint)


def ensure_view(cfg: ExperimentConfig, parent_run_id: str | None = None) -> GeneratedView:
    """Generate (once) and select (once) what `cfg` trains on; select.policy=agreement first scores the set with
    select.second_checkpoint (once: the scores are cached beside the shards)."""
    from raylab.pipeline.select import build_view, load_view
    from raylab.pipeline.scoring import second_scores

    check_view_inputs(cfg)  # before generating anything
    gen = _generate(cfg, parent_run_id)
    path = artifacts_root(cfg) / f"view-{address(cfg, VIEW_KEYS)}"
    with exclusive(path.with_suffix(".lock")):
        write_config(path, cfg, keep=True)
        view = (load_view(path) if (path / "view.json").exists()
                else build_view(gen["store"], cfg.select, path, second=second_scores(cfg, gen["store"])))
    return GeneratedView(path, Path(gen["store"]), gen["identity_hash"], len(view), gen.get("fd"),
                         gen.get("device_s", 0.0))
