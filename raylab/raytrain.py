"""Ray Train plumbing shared by every training stage (EDM, scorer, adversarial): one way to build a
`TorchTrainer`, to checkpoint through Ray Train and to resume from it.

Run names are the deterministic run-directory names (raylab.runs), so rerunning a config resumes it from its latest
Ray Train checkpoint (`checkpoint_manager_snapshot.json`), and `FailureConfig(max_failures)` restarts crashed
workers from the same checkpoints (reference/ray_mlflow.md §1).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from raylab.config import ExperimentConfig
from raylab.runs import RunDir

STATE_FILE = "state.pt"


def make_trainer(train_fn: Callable[[dict], Any], loop_config: dict, cfg: ExperimentConfig, run: RunDir, *,
                 datasets: dict | None = None, callbacks: list | None = None):
    """A TorchTrainer for `cfg.resources` (gloo on CPU, nccl on GPU) storing under `<root>/ray_results/<run>`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    scaling = ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                            resources_per_worker={"GPU": 1, "CPU": res.cpus_per_worker} if res.use_gpu
                            else {"CPU": res.cpus_per_worker})
    run_config = RunConfig(name=run.name, storage_path=str(Path(cfg.tracking.root).resolve() / "ray_results"),
                           failure_config=FailureConfig(max_failures=res.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks)
    ingest = data_config(res.ingest_object_store_mb) if datasets else None
    return TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
                        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
                        datasets=datasets, dataset_config=ingest)


def ingest_options(object_store_mb: int):
    """Ray Data options of the training ingest: a deterministic order (an exact resume replays the same stream),
    within an object-store budget so a worker's memory stays flat in the number of generated rows."""
    from ray.data import ExecutionOptions, ExecutionResources

    options = ExecutionOptions(preserve_order=True)
    if object_store_mb:
        options.resource_limits = ExecutionResources(object_store_memory=object_store_mb * 2**20)
    return options


def data_config(object_store_mb: int):
    """Split every dataset over the workers with `ingest_options`."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all", execution_options=ingest_options(object_store_mb))


def rank_and_world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), max(ctx.get_world_size(), 1)


def load_latest_state() -> dict | None:
    """The state dict of the latest Ray Train checkpoint of this run, or None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def report(metrics: dict, state: dict | None = None) -> None:
    """Report metrics (every rank, same number of calls: it is a barrier) and, from rank 0, a checkpoint."""
    import ray.train

    rank, _ = rank_and_world()
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
