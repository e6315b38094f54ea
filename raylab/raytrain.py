"""Ray Train plumbing shared by every training stage (EDM, scorer, adversarial): one way to build a
`TorchTrainer`, to checkpoint through Ray Train and to resume from it.

Tracking happens where the Ray Train controller runs, never in a worker: workers `ray.train.report` their
per-epoch metrics and `EpochLogger`, a Train V2 `UserCallback` living in the controller (on the driver's node: the
head, beside the MLflow server), logs rank 0's to MLflow and prints one progress line per epoch. Worker nodes
therefore never need to reach the tracking server (README "Scale out").

Run names are the deterministic run-directory names (raylab.runs), so rerunning a config resumes it from its latest
Ray Train checkpoint (`checkpoint_manager_snapshot.json`), and `FailureConfig(max_failures)` restarts crashed
workers from the same checkpoints (reference/ray_mlflow.md §1).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ray.train import UserCallback

from raylab.cluster import check_this_node, root_token
from raylab.config import ExperimentConfig
from raylab.data.datasets import check_dataset
from raylab.runs import RunDir

STATE_FILE = "state.pt"
ROOT_KEY = "shared_root"  # in every worker's loop config: the driver's `RootToken` of tracking.root


def make_trainer(train_fn: Callable[[dict], Any], loop_config: dict, cfg: ExperimentConfig, run: RunDir, *,
                 callbacks: list | None = None):
    """A TorchTrainer for `cfg.resources` (gloo on CPU, nccl on GPU) storing under `<root>/ray_results/<run>`; its
    workers get the shared root's token (ROOT_KEY) for `worker_preflight`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    scaling = ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, placement_strategy=res.placement,
                            resources_per_worker={"GPU": 1, "CPU": res.cpus_per_worker} if res.use_gpu
                            else {"CPU": res.cpus_per_worker})
    run_config = RunConfig(name=run.name, storage_path=str(Path(cfg.tracking.root).resolve() / "ray_results"),
                           failure_config=FailureConfig(max_failures=res.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks)
    return TorchTrainer(train_fn, train_loop_config={**loop_config, ROOT_KEY: root_token(cfg.tracking.root)},
                        scaling_config=scaling, run_config=run_config,
                        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"))


def worker_preflight(cfg: ExperimentConfig, loop_config: dict) -> None:
    """First on every Ray Train worker, before its first step, wherever Ray placed or restarted it (an autoscaled
    node joins after the job's start-up probe): its node sees the shared root the driver wrote its token under, and
    holds data.dataset intact. One line naming the node otherwise."""
    check_this_node(loop_config.get(ROOT_KEY))
    check_dataset(cfg.data)


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


# ---------------------------------------------------------------------------------------------------------------
# Tracking from the controller.

def progress_line(metrics: dict, step_key: str, total: int, eta_s: float) -> str:
    """`epoch 2/3  loss 0.912  clean 61.2%  robust 40.6%  850 img/s  ETA 0:01:10`: the main job's progress."""
    parts = [f"{step_key} {int(metrics[step_key])}/{total}"]
    # the training worker reports its validation robust accuracy by the attack that measured it: val_pgd{k}_acc
    robust = next((k for k in metrics if k.startswith("val_pgd") and k.endswith("_acc")), "val_robust_acc")
    for key, label, pct in (("train_loss", "loss", False), ("loss", "loss", False),
                            ("val_clean_acc", "clean", True), (robust, "robust", True)):
        if key in metrics and not any(p.startswith(label + " ") for p in parts):
            parts.append(f"{label} {100 * metrics[key]:.1f}%" if pct else f"{label} {metrics[key]:.3f}")
    if "train_images_per_s" in metrics:
        parts.append(f"{metrics['train_images_per_s']:.0f} img/s")
    if math.isfinite(eta_s):
        parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(max(eta_s, 0)))}")
    return "  ".join(parts)


class EpochLogger(UserCallback):
    """Logs rank 0's `ray.train.report` metrics to one MLflow run, at step `metrics[step_key]`, and prints a
    progress line per step. Runs in the Train controller (`ray.train.UserCallback`), so workers never talk to MLflow.

    Exactly once per step: a step already in the run's history (a resumed controller, or a worker group restarted
    after losing a node, re-reporting an epoch) is not logged again."""

    def __init__(self, uri: str, run_id: str, step_key: str, total: int, label: str = "") -> None:
        self.uri, self.run_id, self.step_key, self.total, self.label = uri, run_id, step_key, total, label
        self._logged: set[int] | None = None
        self._last: tuple[float, int] | None = None  # (time, step) of the previous report: the ETA's pace

    def logged_steps(self) -> set[int]:
        if self._logged is None:
            from raylab.tracking import logged_steps

            self._logged = logged_steps(self.uri, self.run_id, self.step_key)
        return self._logged

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if not metrics or self.step_key not in metrics[0]:
            return
        self.log(metrics[0])

    def log(self, metrics: dict) -> bool:
        """Log one report (rank 0's metrics); False when its step was logged before."""
        from raylab.tracking import Tracker

        step = int(metrics[self.step_key])
        if step in self.logged_steps():
            print(f"{self.label}{self.step_key} {step} reported again (the run restarted before its checkpoint): "
                  "already in MLflow, not logged twice", flush=True)
            return False
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        Tracker.attach(self.uri, self.run_id).log_metrics(numeric, step=step)
        self._logged.add(step)
        print(f"{self.label}{progress_line(metrics, self.step_key, self.total, self._eta(step))}", flush=True)
        return True

    def replay(self, history: list[dict]) -> int:
        """Log what the controller did not (local mode runs without one): rank 0's returned history, deduplicated
        (quietly: after a normal run every step is there)."""
        missing = [m for m in history if int(m.get(self.step_key, -1)) not in self.logged_steps()]
        return sum(self.log(metrics) for metrics in missing)

    def _eta(self, step: int) -> float:
        now, last = time.monotonic(), self._last
        self._last = (now, step)
        if last is None or step <= last[1]:
            return math.nan
        return (now - last[0]) / (step - last[1]) * (self.total - step)

