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
                 callbacks: list | None = None):
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
    return TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
                        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"))


def rank_and_world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), max(ctx.get_world_size(), 1)


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def load_latest_state(rank: int = 0) -> tuple[dict | None, dict | None]:
    """(shared state, this rank's own state) of the latest Ray Train checkpoint of this run; (None, None) on a
    fresh start. The rank's own part is None when the checkpoint has none for it (taken with fewer workers)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    with ckpt.as_directory() as d:
        own = Path(d) / rank_file(rank)
        return (torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True),
                torch.load(own, map_location="cpu", weights_only=True) if own.exists() else None)


def report(metrics: dict, state: tuple[dict, dict] | dict | None = None) -> None:
    """Report metrics (every rank, same number of calls: it is a barrier) and a checkpoint. `state` is the shared
    state (written by rank 0) and, as a pair, each rank's own part too (`rank-<r>.pt`): Ray Train merges the
    files every rank reports into one checkpoint directory."""
    import ray.train

    rank, _ = rank_and_world()
    shared, own = state if isinstance(state, tuple) else (state, None)
    if shared is None or (rank != 0 and own is None):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(shared, Path(d) / STATE_FILE)
        if own is not None:
            torch.save(own, Path(d) / rank_file(rank))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
