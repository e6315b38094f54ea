"""Run directories: `<tracking.root>/<stage>/<name>/` holding the resolved config, checkpoints and results.

Names are deterministic (stage + content hash of the config keys that produce the run), so rerunning the same
config finds and resumes the same directory instead of starting over; a changed config gets a new directory.
Nothing here ever deletes a run directory (the reference `rmtree`d its log dir at start-up, training_recipe.md §4.2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raylab.config import ExperimentConfig, fingerprint, to_json
from raylab.io import atomic_write_text

CONFIG_NAME = "config.json"

# What determines the bytes and scores of a generated set (not generate.batch_size: bytes do not depend on it).
GENERATION_KEYS = ["data.dataset", "data.root", "edm", "generate.generator", "generate.checkpoint", "generate.steps",
                   "generate.solver", "generate.sigma_min", "generate.sigma_max", "generate.rho", "generate.s_churn",
                   "generate.s_min", "generate.s_max", "generate.s_noise", "generate.per_class", "generate.shard_size",
                   "generate.seed", "generate.seed_mode", "generate.latents_on_cpu", "generate.gaussian_rank",
                   "select.scorer_model", "select.scorer_checkpoint"]

# Config keys that determine each stage's output (the rest, e.g. tracking or eval knobs, do not).
STAGE_KEYS: dict[str, list[str]] = {
    "edm": ["data.dataset", "data.val_size", "data.max_train", "edm"],
    # Of the scorer's derived config (`train.job.scorer_config`: model = select.scorer_model, CE, no smoothing), so
    # every training knob that changes the classifier names a new run.
    "scorer": ["data", "model", "train", "resources.num_workers"],
    "generate": GENERATION_KEYS,
    "train": ["data", "generate", "select", "model", "attack", "train", "resources.num_workers"],
}


@dataclass(frozen=True)
class RunDir:
    stage: str
    name: str
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME


def write_config(directory: str | os.PathLike, cfg: ExperimentConfig, keep: bool = False) -> Path:
    """`<directory>/config.json` = the resolved config (strict JSON, `raylab.config.to_json`), written atomically
    and only when absent or different: a resumed run leaves the file (and its mtime) as it was. `keep` leaves any
    existing file: a shared artifact keeps the config of the first trial that asked for it."""
    path = Path(directory) / CONFIG_NAME
    text = to_json(cfg) + "\n"
    if not (path.is_file() and (keep or path.read_text() == text)):
        atomic_write_text(path, text)
    return path


def run_dir(cfg: ExperimentConfig, stage: str, name: str | None = None) -> RunDir:
    """The deterministic directory of `stage` for `cfg` (created, with the resolved config written atomically)."""
    name = name or f"{stage}-{fingerprint(cfg, STAGE_KEYS[stage])}"
    path = Path(cfg.tracking.root).resolve() / stage / name
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(stage, name, path)
    write_config(path, cfg)
    return run
