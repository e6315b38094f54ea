"""Run directories: `<tracking.root>/<stage>/<name>/` holding the resolved config, checkpoints and results.

A run's identity (`run_identity`) is the one definition of "the same run": the content hash of the config keys
that produce it (STAGE_KEYS) and of the content identities of the data it reads besides its config (STAGE_INPUTS:
the original split, the generated view and its scorer, an evaluation's weights). Names are deterministic (stage +
identity), so rerunning the same inputs finds and resumes the same directory instead of starting over; a changed
config, or the same config on other data (another generated view, retrained weights), gets a new directory.
Input identities are those the inputs already record (manifests, view files) or one file's hash, never a pass
over the shards. Nothing here ever deletes a run directory (the reference `rmtree`d its log dir at start-up,
training_recipe.md §4.2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from raylab.config import EvalConfig, ExperimentConfig, fingerprint, to_json
from raylab.io import atomic_write_text

CONFIG_NAME = "config.json"

# What determines the bytes and scores of a generated set (not generate.batch_size: bytes do not depend on it).
GENERATION_KEYS = ["data.dataset", "data.root", "edm", "generate.generator", "generate.checkpoint", "generate.steps",
                   "generate.solver", "generate.sigma_min", "generate.sigma_max", "generate.rho", "generate.s_churn",
                   "generate.s_min", "generate.s_max", "generate.s_noise", "generate.per_class", "generate.shard_size",
                   "generate.seed", "generate.seed_mode", "generate.latents_on_cpu", "generate.gaussian_rank",
                   "select.scorer_model", "select.scorer_checkpoint"]

# Config keys that determine each stage's output (the rest, e.g. tracking, or eval knobs for training, do not).
STAGE_KEYS: dict[str, list[str]] = {
    "edm": ["data.dataset", "data.val_size", "data.max_train", "edm"],
    # Of the scorer's derived config (`train.job.scorer_config`: model = select.scorer_model, CE, no smoothing), so
    # every training knob that changes the classifier names a new run.
    "scorer": ["data", "model", "train", "resources.num_workers"],
    "generate": GENERATION_KEYS,
    "train": ["data", "generate", "select", "model", "attack", "train", "resources.num_workers"],
    # Every eval knob but num_test (a larger num_test reuses the chunks it shares) and transfer (a reporting flag).
    "eval": ["data.dataset", "model.name", "model.activation",
             *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig) if f.name not in ("num_test", "transfer"))],
}

# What a stage reads besides its config, by content identity (input name -> hash); its run identity needs them all.
# original: the training split as loaded (raylab.data.datasets.split_identity); generated: the generated view, i.e.
# its store's identity and its selected rows, or a whole store's identity and shards (raylab.pipeline.select
# .generated_lineage), "none" at train.ratio=1; scorer: the sha256 of the scorer that scored and labelled that
# store, as its manifest records it (not select.scorer_checkpoint's file today: that may have been retrained since);
# weights: the sha256 of the evaluated checkpoint; format: the evaluation's chunk format (raylab.eval.job.FORMAT).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {"scorer": ("original",), "train": ("original", "generated", "scorer"),
                                            "eval": ("weights", "format")}


@dataclass(frozen=True)
class RunDir:
    stage: str
    name: str
    path: Path
    inputs: Mapping[str, str] = field(default_factory=dict, hash=False)  # the content identities its name covers

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


def run_identity(cfg: ExperimentConfig, stage: str, inputs: Mapping[str, str] | None = None) -> str:
    """Content address of a `stage` run of `cfg` on `inputs` (input name -> content identity, STAGE_INPUTS)."""
    inputs = dict(inputs or {})
    missing = [k for k in STAGE_INPUTS.get(stage, ()) if not inputs.get(k)]
    if missing:
        raise ValueError(f"{stage} run identity: no content identity for input(s) {', '.join(missing)} (needs "
                         f"{', '.join(STAGE_INPUTS[stage])})")
    if not inputs:
        return fingerprint(cfg, STAGE_KEYS[stage])
    text = json.dumps({"config": fingerprint(cfg, STAGE_KEYS[stage]), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_dir(cfg: ExperimentConfig, stage: str, name: str | None = None, *, inputs: Mapping[str, str] | None = None,
            prefix: str | None = None) -> RunDir:
    """The deterministic directory of `stage` for `cfg` on `inputs`, `<prefix or stage>-<run_identity>` unless
    `name` is given (created, with the resolved config written atomically)."""
    name = name or f"{prefix or stage}-{run_identity(cfg, stage, inputs)}"
    path = Path(cfg.tracking.root).resolve() / stage / name
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(stage, name, path, dict(inputs or {}))
    write_config(path, cfg)
    return run
