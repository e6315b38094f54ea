"""The Ray Train worker of adversarial (and standard) training: DDP, the streamed original/generated mix,
per-epoch validation with the EMA model, checkpoints with everything needed for an exact resume.

Every rank runs `train_worker(loop_config)`; every rank validates its own slice of the validation and test images
(the counts are summed over ranks), and rank 0 alone writes `best.pt`/`last.pt` into the run directory (on the
shared root). Reports go to Ray Train once per epoch (each `report` can block ~2 s:
reference/ray_mlflow.md §1); the controller's `EpochLogger` logs rank 0's to MLflow: workers never talk to it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raylab.config import ExperimentConfig, from_flat
from raylab.data.datasets import ImageSet, Splits, load_splits
from raylab.data.mix import GeneratedStream, OriginalStream, split_batch, steps_per_epoch
from raylab.data.row_index import RowIndex
from raylab.eval.metrics import correct_flags, pgd_flags, random_starts
from raylab.io import atomic_write
from raylab.models import create_model
from raylab.preempt import stop_requested
from raylab.raytrain import load_latest_state, rank_and_world, report, worker_preflight
from raylab.runtime import gpu_backends, rng_state, seed_everything, set_rng_state, torch_threads
from raylab.train.ema import WeightAverage
from raylab.train.ingest import generated_stream
from raylab.train.loop import TrainContext, mixed_batches, run_epoch, to_input
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler

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


def build_streams(cfg: ExperimentConfig, splits: Splits, rank: int, world: int,
                  generated: RowIndex | None) -> Streams:
    n_orig, _ = split_batch(cfg.train.batch_size // world, cfg.train.ratio)
    original = OriginalStream(len(splits.train), n_orig, seed=cfg.train.seed, rank=rank, world=world)
    return Streams(original, generated_stream(cfg, generated, rank, world) if generated is not None else None)


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
    """What every rank shares (weights, optimizer, schedule, stream positions: identical on every rank)."""
    raw = getattr(ctx.model, "module", ctx.model)
    return {"model": raw.state_dict(), "ema": ctx.ema.state_dict(), "optimizer": ctx.optimizer.state_dict(),
            "schedule": ctx.schedule.state_dict(), "step": ctx.step,
            "original": streams.original.state_dict(),
            "generated": streams.generated.state_dict() if streams.generated else None,
            "epoch": epoch, "best": best, "history": history}


def rank_state(ctx: TrainContext) -> dict:
    """What differs between ranks: their random streams (ranks are seeded apart: attack noise, augmentation)."""
    return {"generator": ctx.generator.get_state(), "process": rng_state()}


def restore(ctx: TrainContext, streams: Streams, state: dict, own: dict | None) -> tuple[int, dict, list]:
    getattr(ctx.model, "module", ctx.model).load_state_dict(state["model"])
    ctx.ema.load_state_dict(state["ema"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.schedule.load_state_dict(state["schedule"])
    ctx.step = int(state["step"])
    streams.original.load_state_dict(state["original"])
    if streams.generated is not None:
        streams.generated.load_state_dict(state["generated"])
    if own is not None:  # None: this rank did not exist when the checkpoint was taken; it keeps its fresh seeds
        ctx.generator.set_state(own["generator"])
        set_rng_state(own["process"])
    return int(state["epoch"]), dict(state["best"]), list(state["history"])


def validate(model: torch.nn.Module, device: torch.device, cfg: ExperimentConfig, splits: Splits, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    """Validation PGD (margin loss, `val_pgd{k}_acc`: the name says the steps that ran) on the held-out images
    and test clean accuracy, both with `model` (the EMA model). Each of the `world` ranks scores its own slice of
    both sets and the correct counts are summed over the ranks, so every rank returns what one device validating
    everything returns (on one device, PGD-k of the validation set outlasts an epoch's training at 32 GPUs:
    issue 24), exactly: an image's PGD start is drawn for the whole set (`random_starts`), whatever the slicing."""
    test, val = (rank_slice(len(images), rank, world) for images in (splits.test, splits.val))
    counts = {"test_clean_acc": _clean_correct(model, device, cfg, splits.test, test)}
    totals = {"test_clean_acc": len(splits.test)}
    if len(splits.val):
        counts.update(_val_correct(model, device, cfg, splits.val, val))
        totals.update(dict.fromkeys(("val_clean_acc", val_metric(cfg)), len(splits.val)))
    summed = sum_over_ranks(list(counts.values()), device, world)
    return {name: count / totals[name] for name, count in zip(counts, summed)}


def rank_slice(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of n images: the ranks' shares partition them, sizes differ by at most one."""
    return slice(n * rank // world, n * (rank + 1) // world)


def _clean_correct(model: torch.nn.Module, device: torch.device, cfg: ExperimentConfig, split: ImageSet,
                   part: slice) -> int:
    x, y = to_input(split.images[part], device), torch.as_tensor(split.labels[part], device=device)
    return int(correct_flags(model, x, y, batch_size=cfg.eval.batch_size).sum())


def _val_correct(model: torch.nn.Module, device: torch.device, cfg: ExperimentConfig, val: ImageSet,
                 part: slice) -> dict[str, int]:
    """Clean and PGD-correct counts of this rank's part of the validation images. Every rank draws the random
    starts of the whole set from the same seed (the same attack noise every epoch) and attacks its part with its
    part of them."""
    x, y = to_input(val.images, device), torch.as_tensor(val.labels, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    start = random_starts(x, norm=cfg.attack.norm, eps=cfg.attack.eps, generator=gen)[part]
    x, y, batch = x[part], y[part], cfg.eval.batch_size
    robust = pgd_flags(model, x, y, norm=cfg.attack.norm, eps=cfg.attack.eps, step=cfg.attack.step,
                       steps=cfg.train.val_pgd_steps, batch_size=batch, start=start)
    clean = correct_flags(model, x, y, batch_size=batch)
    return {"val_clean_acc": int(clean.sum()), val_metric(cfg): int(robust.sum())}


def sum_over_ranks(counts: list[int], device: torch.device, world: int) -> list[int]:
    """The counts summed over all ranks, on every rank (all_reduce; integers, so the sum is exact). One rank (local
    mode, one worker) has no process group and nothing to add."""
    if world == 1:
        return counts
    total = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


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


def _trace(batches, streams: Streams, loop_config: dict, epoch: int):
    """`loop_config["trace"] = dir`: every rank records the seed and label of each generated row of each batch of
    the epoch (`trace/rank-<r>-epoch-<e>.npz`): what the mixing tests check against the view."""
    out = loop_config.get("trace")
    if not out or streams.generated is None:
        yield from batches
        return
    seeds, labels = [], []
    for images, y in batches:
        seeds.append(streams.generated.last_seeds.copy())
        labels.append(y[-len(seeds[-1]):].copy())
        yield images, y
    rank, _ = rank_and_world()
    atomic_write(Path(out) / f"rank-{rank}-epoch-{epoch + 1}.npz",
                 lambda tmp: _save_npz(tmp, seed=np.stack(seeds), label=np.stack(labels)))


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temp file's name
        np.savez(f, **arrays)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    cfg = from_flat(loop_config["flat"])
    # As many intra-op threads as the worker holds CPUs; the GPU numerics of train.tf32 / train.deterministic.
    with torch_threads(cfg.resources.cpus_per_worker), gpu_backends(cfg.train.tf32, cfg.train.deterministic):
        return _train(cfg, loop_config)


def _train(cfg: ExperimentConfig, loop_config: dict[str, Any]) -> dict[str, Any]:
    worker_preflight(cfg, loop_config)
    rank, world = rank_and_world()
    seed_everything(cfg.train.seed)  # identical initial weights on every rank; per-rank noise: ctx.generator
    splits = load_splits(cfg.data)
    # The reference counts the whole training split in an epoch, its held-out validation images included.
    steps = steps_per_epoch(cfg.train.epoch_length, batch_size=cfg.train.batch_size,
                            num_original=len(splits.train) + len(splits.val),
                            num_generated=len(loop_config.get("generated") or ()), ratio=cfg.train.ratio)
    ctx = build_context(cfg, splits, steps, world)
    streams = build_streams(cfg, splits, rank, world, loop_config.get("generated"))
    start, best, history = 0, {"metric": selection_metric(cfg, len(splits.val)), "score": -math.inf, "epoch": -1}, []
    state, own = load_latest_state(rank)
    if state is not None:
        start, best, history = restore(ctx, streams, state, own)
    run_path = Path(loop_config["run_dir"])
    if start < cfg.train.epochs and _stop_agreed(loop_config, ctx.device, world):  # a restart after the request
        return {"history": history, "best": best, "stopped": start}
    for epoch in range(start, cfg.train.epochs):
        lr = ctx.schedule.last_lr()[0]  # the LR this epoch starts with (constant within it when per-epoch)
        batches = _trace(_epoch_batches(splits, streams, steps), streams, loop_config, epoch)
        stats = run_epoch(ctx, _fault_drill(batches, loop_config, epoch))
        metrics = {"epoch": epoch + 1, **stats.as_metrics(lr)}
        _refresh_bn(ctx, splits, streams)  # on every rank: the same images, so the same BN statistics
        metrics.update(validate(ctx.ema.module, ctx.device, cfg, splits, rank, world))
        best = _keep_best(run_path, ctx, epoch + 1, metrics, best, write=rank == 0)
        history.append(metrics)
        last = epoch + 1 == cfg.train.epochs
        if rank == 0 and last:
            save_weights(run_path / "last.pt", ctx, epoch + 1, metrics)
        stop = not last and _stop_agreed(loop_config, ctx.device, world)
        due = last or stop or (epoch + 1) % cfg.train.checkpoint_every == 0
        report(metrics, (state_dict(ctx, streams, epoch + 1, best, history), rank_state(ctx)) if due else None)
        if stop:
            return {"history": history, "best": best, "stopped": epoch + 1}
    return {"history": history, "best": best}


def _stop_agreed(loop_config: dict, device: torch.device, world: int) -> bool:
    """Whether any rank sees the stop request (raylab.preempt). Summed over ranks so that all stop after the same
    epoch: `report` is a barrier, and a rank that saw the file a moment later would wait there forever."""
    seen = int(stop_requested(loop_config.get("stop_file")))
    return sum_over_ranks([seen], device, world)[0] > 0


def selection_metric(cfg: ExperimentConfig, val_rows: int) -> str:
    """What picks `best.pt`: validation PGD accuracy (Wang et al. 2023 Tables 4-5: PGD-40); clean accuracy for the
    CE scorer. Without validation images (data.val_size=0) the latest epoch: picking by test accuracy would report a
    test number that was also used for model selection."""
    if not val_rows:
        return "epoch"
    return "val_clean_acc" if cfg.train.loss == "ce" else val_metric(cfg)


def val_metric(cfg: ExperimentConfig) -> str:
    return f"val_pgd{cfg.train.val_pgd_steps}_acc"


def _keep_best(run_path: Path, ctx: TrainContext, epoch: int, metrics: dict, best: dict, write: bool) -> dict:
    """Every rank picks from the same summed metrics, so all agree on `best` (part of the checkpoint state); the
    writer (rank 0) saves `best.pt`. Of tied scores the later epoch wins (`>=`); `best_epoch` says which, and the
    sweep report's per-epoch figure stars that epoch, never re-deriving it."""
    score = metrics[best["metric"]]
    if score >= best["score"]:
        if write:
            save_weights(run_path / "best.pt", ctx, epoch, metrics)
        return {**best, "score": score, "epoch": epoch}
    return best
