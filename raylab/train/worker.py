"""The Ray Train worker of adversarial (and standard) training: DDP, the streamed original/generated mix,
per-epoch validation with the EMA model, checkpoints with everything needed for an exact resume.

Every rank runs `train_worker(loop_config)`; rank 0 alone validates, writes `best.pt`/`last.pt` into the run
directory and logs to MLflow. Reports go to Ray Train once per epoch (each `report` can block ~2 s:
reference/ray_mlflow.md §1).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylab.config import ExperimentConfig, from_flat
from raylab.data.datasets import Splits, load_splits
from raylab.data.mix import GeneratedStream, OriginalStream, split_batch, steps_per_epoch
from raylab.eval.metrics import clean_accuracy, pgd_accuracy
from raylab.io import atomic_write
from raylab.models import create_model
from raylab.raytrain import load_latest_state, rank_and_world, report
from raylab.runtime import seed_everything, torch_threads
from raylab.tracking import rank_zero_tracker
from raylab.train.ema import WeightAverage
from raylab.train.loop import TrainContext, mixed_batches, run_epoch, to_input
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler

GENERATED = "generated"  # the Ray Data dataset name the driver passes


@dataclass
class Streams:
    original: OriginalStream
    generated: GeneratedStream | None


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def _prepare(model: torch.nn.Module, world: int) -> torch.nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(model) if world > 1 else model


def build_streams(cfg: ExperimentConfig, splits: Splits, rank: int, world: int) -> Streams:
    n_orig, n_gen = split_batch(cfg.train.batch_size // world, cfg.train.ratio)
    original = OriginalStream(len(splits.train), n_orig, seed=cfg.train.seed, rank=rank, world=world)
    generated = None
    if n_gen:
        import ray.train

        generated = GeneratedStream(ray.train.get_dataset_shard(GENERATED), n_gen, seed=cfg.train.seed + rank)
    return Streams(original, generated)


def build_context(cfg: ExperimentConfig, splits: Splits, steps: int, world: int) -> TrainContext:
    device = _device()
    model = create_model(cfg.model.name, num_classes=splits.num_classes, mean=splits.mean, std=splits.std,
                         activation=cfg.model.activation).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = WeightAverage.from_config(model, cfg.train, steps)
    model = _prepare(model, world)
    optimizer = build_optimizer(model, cfg.train, cfg.train.batch_size)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.train.seed * 1000 + rank_and_world()[0])
    return TrainContext(model=model, optimizer=optimizer, schedule=build_scheduler(optimizer, cfg.train, steps),
                        ema=ema, train=cfg.train, attack=cfg.attack, num_classes=splits.num_classes, device=device,
                        generator=generator)


def state_dict(ctx: TrainContext, streams: Streams, epoch: int, best: dict, history: list) -> dict:
    raw = getattr(ctx.model, "module", ctx.model)
    return {"model": raw.state_dict(), "ema": ctx.ema.state_dict(), "optimizer": ctx.optimizer.state_dict(),
            "schedule": ctx.schedule.state_dict(), "generator": ctx.generator.get_state(), "step": ctx.step,
            "original": streams.original.state_dict(),
            "generated": streams.generated.state_dict() if streams.generated else None,
            "epoch": epoch, "best": best, "history": history}


def restore(ctx: TrainContext, streams: Streams, state: dict) -> tuple[int, dict, list]:
    getattr(ctx.model, "module", ctx.model).load_state_dict(state["model"])
    ctx.ema.load_state_dict(state["ema"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.schedule.load_state_dict(state["schedule"])
    ctx.generator.set_state(state["generator"])
    ctx.step = int(state["step"])
    streams.original.load_state_dict(state["original"])
    if streams.generated is not None:
        streams.generated.load_state_dict(state["generated"])
    return int(state["epoch"]), dict(state["best"]), list(state["history"])


def validate(ctx: TrainContext, cfg: ExperimentConfig, splits: Splits) -> dict[str, float]:
    """Validation PGD-40 (margin loss) on the held-out images and test clean accuracy, both with the EMA model."""
    model, batch = ctx.ema.module, cfg.eval.batch_size
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed)  # same attack noise every epoch
    out = {"test_clean_acc": clean_accuracy(model, to_input(splits.test.images, ctx.device),
                                            torch.as_tensor(splits.test.labels, device=ctx.device),
                                            batch_size=batch)}
    if len(splits.val):
        x, y = to_input(splits.val.images, ctx.device), torch.as_tensor(splits.val.labels, device=ctx.device)
        out["val_clean_acc"] = clean_accuracy(model, x, y, batch_size=batch)
        out["val_robust_acc"] = pgd_accuracy(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps,
                                             step=cfg.attack.step, steps=cfg.train.val_pgd_steps,
                                             batch_size=batch, generator=gen)
    return out


def save_weights(path: Path, ctx: TrainContext, epoch: int, metrics: dict) -> None:
    payload = {"model": ctx.ema.module.state_dict(), "epoch": epoch, "metrics": metrics}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _epoch_batches(splits: Splits, streams: Streams, steps: int):
    return mixed_batches(streams.original, streams.generated, splits.train.images, splits.train.labels, steps)


def _refresh_bn(ctx: TrainContext, splits: Splits, streams: Streams) -> None:
    """train.ema_bn=recompute: re-estimate the EMA model's BN statistics on original training batches."""
    if ctx.train.ema_bn == "recompute":
        idx = np.arange(min(len(splits.train), 20 * max(streams.original.batch, 1)))
        ctx.ema.recompute_bn(to_input(splits.train.images[i], ctx.device) for i in np.array_split(idx, 20))


def _fault_drill(batches, loop_config: dict, epoch: int):
    """Fault-injection drill (tests, chaos runs): `loop_config["crash"] = {"epoch", "after_steps", "marker"}` kills
    this worker process mid-epoch once (the marker file makes the retried attempt run through)."""
    crash = loop_config.get("crash")
    for i, batch in enumerate(batches):
        if crash and epoch + 1 == crash["epoch"] and i == crash["after_steps"] and not Path(crash["marker"]).exists():
            Path(crash["marker"]).write_text("crashed")
            os._exit(1)
        yield batch


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    cfg = from_flat(loop_config["flat"])
    with torch_threads(cfg.resources.cpus_per_worker):  # as many intra-op threads as the worker holds CPUs
        return _train(cfg, loop_config)


def _train(cfg: ExperimentConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    rank, world = rank_and_world()
    seed_everything(cfg.train.seed)  # identical initial weights on every rank; per-rank noise: ctx.generator
    splits = load_splits(cfg.data)
    steps = steps_per_epoch(cfg.train.epoch_length, batch_size=cfg.train.batch_size,
                            num_original=len(splits.train), num_generated=loop_config.get("generated_rows", 0),
                            ratio=cfg.train.ratio)
    ctx = build_context(cfg, splits, steps, world)
    streams = build_streams(cfg, splits, rank, world)
    start, best, history = 0, {"metric": selection_metric(cfg), "score": -math.inf, "epoch": -1}, []
    state = load_latest_state()
    if state is not None:
        start, best, history = restore(ctx, streams, state)
    tracker = rank_zero_tracker(rank, loop_config.get("mlflow_uri"), loop_config.get("mlflow_run_id"))
    run_path = Path(loop_config["run_dir"])
    for epoch in range(start, cfg.train.epochs):
        lr = ctx.schedule.last_lr()[0]  # the LR this epoch starts with (constant within it when per-epoch)
        stats = run_epoch(ctx, _fault_drill(_epoch_batches(splits, streams, steps), loop_config, epoch))
        metrics = {"epoch": epoch + 1, **stats.as_metrics(lr)}
        if rank == 0:
            _refresh_bn(ctx, splits, streams)
            metrics.update(validate(ctx, cfg, splits))
            best = _keep_best(run_path, ctx, epoch + 1, metrics, best)
            tracker.log_metrics(metrics, step=epoch + 1)
        history.append(metrics)
        last = epoch + 1 == cfg.train.epochs
        if rank == 0 and last:
            save_weights(run_path / "last.pt", ctx, epoch + 1, metrics)
        due = last or (epoch + 1) % cfg.train.checkpoint_every == 0
        report(metrics, state_dict(ctx, streams, epoch + 1, best, history) if due else None)
    return {"history": history, "best": best}


def selection_metric(cfg: ExperimentConfig) -> str:
    """What picks `best.pt`: validation PGD-40 accuracy (Wang et al. 2023 Tables 4-5); clean accuracy for the CE
    scorer."""
    return "val_clean_acc" if cfg.train.loss == "ce" else "val_robust_acc"


def _keep_best(run_path: Path, ctx: TrainContext, epoch: int, metrics: dict, best: dict) -> dict:
    score = metrics.get(best["metric"], metrics["test_clean_acc"])
    if score >= best["score"]:
        save_weights(run_path / "best.pt", ctx, epoch, metrics)
        return {**best, "score": score, "epoch": epoch}
    return best
