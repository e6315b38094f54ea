"""Helpers of the pipeline tests: tiny random stand-ins for trained models, and the job config they use."""
from pathlib import Path

import torch

from raylab.config import ExperimentConfig, to_json
from raylab.presets import make_config
from raylab.data.datasets import get_dataset
from raylab.models import create_model

TINY_EDM = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), augment_dim=0,
                dropout=0.0)


def save_scorer(folder: Path, cfg: ExperimentConfig, seed: int) -> Path:
    """A random `cfg.model.name` in the `best.pt` format of raylab's trained classifiers, with the run's config.json."""
    spec = get_dataset("digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(cfg.model.name, num_classes=spec.num_classes, mean=spec.mean, std=spec.std)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 0, "metrics": {}}, folder / "best.pt")
    (folder / "config.json").write_text(to_json(cfg))
    return folder


def job_config(assets: dict[str, Path], tmp_path: Path, overrides: dict | None = None) -> ExperimentConfig:
    """The tiny preset cut to one Euler step and 120 images in 6 shards of 20, CPU actors, tracking off-tree."""
    flat = {"generate.checkpoint": str(assets["edm"]), "generate.per_class": 12, "generate.shard_size": 20,
            "generate.steps": 1, "generate.solver": "euler", "generate.batch_size": 8,
            "select.scorer_checkpoint": str(assets["scorer"]), "resources.sampler_actors": 2,
            "tracking.root": str(tmp_path / "runs")}
    return make_config("tiny", flat | (overrides or {}))
