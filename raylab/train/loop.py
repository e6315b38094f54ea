"""One epoch of adversarial training and the per-epoch checks, in pure torch (no Ray, no MLflow).

The Ray Train worker (raylab.train.worker) builds a `TrainContext` and calls `run_epoch` once per epoch with the
mixed batch stream; tests call the same functions directly.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from raylab.config import AttackConfig, TrainConfig
from raylab.data.mix import GeneratedStream, OriginalStream
from raylab.precision import autocast
from raylab.train.augment import augment
from raylab.train.ema import WeightAverage
from raylab.train.losses import get_loss
from raylab.train.optim import clip_gradients
from raylab.train.schedules import Schedule

Batch = tuple[np.ndarray, np.ndarray]  # uint8 NHWC images, int64 labels
Tensor = torch.Tensor


def to_device(array: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host batch on `device`. To a GPU through pinned memory with a non-blocking copy: a copy from pageable
    memory waits for the GPU's queue to drain first (a host sync per batch). CPU tensors are not copied."""
    t = torch.as_tensor(array, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_input(images: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] on `device` (the models normalize inside, training_recipe.md §1)."""
    x = to_device(images, device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class TrainContext:
    """Everything one training step needs; `model` may be DDP-wrapped, `ema` holds the evaluated weights."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: WeightAverage
    train: TrainConfig
    attack: AttackConfig
    num_classes: int
    device: torch.device
    generator: torch.Generator
    step: int = 0

    def __post_init__(self) -> None:
        self.loss_fn = get_loss(self.train.loss)  # fails on an unknown loss before any step

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training forward/backward's precision (raylab.precision); the attack inside picks its own."""
        return autocast(self.device.type, self.train.bf16)


@dataclass
class EpochStats:
    loss: float = 0.0
    clean_correct: int = 0
    robust_correct: int = 0
    images: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_metrics(self, lr: float) -> dict[str, float]:
        n = max(self.images, 1)
        return {"train_loss": self.loss / max(len(self.losses), 1), "train_clean_acc": self.clean_correct / n,
                "train_robust_acc": self.robust_correct / n, "lr": lr,
                "train_images_per_s": self.images / max(self.seconds, 1e-9)}


def _hard_labels(target: torch.Tensor) -> torch.Tensor:
    return target.argmax(dim=1) if target.dim() == 2 else target


def train_step(ctx: TrainContext, images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Augment, attack, one optimizer step, schedule and EMA update. Returns (loss, clean correct, robust correct)
    as tensors on the device: reading them here would stall the GPU's queue three times a step."""
    x = to_input(images, ctx.device, ctx.train.channels_last)
    y = to_device(labels, ctx.device, torch.int64)
    x, target = augment(ctx.train.augment, x, y, ctx.num_classes, ctx.generator)
    ctx.model.train()
    with ctx.autocast():
        loss, stats = ctx.loss_fn(ctx.model, x, target, cfg=ctx.train, attack=ctx.attack, generator=ctx.generator)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(ctx.model, ctx.train.grad_clip)
    ctx.optimizer.step()
    ctx.schedule.step()
    ctx.ema.update(ctx.model, ctx.step)
    ctx.step += 1
    hard = _hard_labels(target)
    clean = (stats["logits_clean"].argmax(1) == hard).sum()
    robust = (stats["logits_adv"].argmax(1) == hard).sum()
    return loss.detach(), clean, robust


def run_epoch(ctx: TrainContext, batches: Iterable[Batch]) -> EpochStats:
    """Every step's numbers stay on the device; the epoch reads them back once, at its end."""
    start = time.perf_counter()
    losses, correct, images = [], torch.zeros(2, dtype=torch.int64, device=ctx.device), 0
    for batch_images, labels in batches:
        loss, clean, robust = train_step(ctx, batch_images, labels)
        losses.append(loss.float())
        correct += torch.stack((clean, robust))
        images += len(labels)
    if not losses:
        return EpochStats(seconds=time.perf_counter() - start)
    # One host read (float64 holds the counts exactly); it waits for the last step, so `seconds` is honest on GPU.
    *per_step, clean, robust = torch.cat([torch.stack(losses).double(), correct.double()]).tolist()
    return EpochStats(loss=sum(per_step), clean_correct=int(clean), robust_correct=int(robust), images=images,
                      seconds=time.perf_counter() - start, losses=per_step)


def mixed_batches(original: OriginalStream, generated: GeneratedStream | None, images: np.ndarray,
                  labels: np.ndarray, steps: int) -> Iterator[Batch]:
    """`steps` batches of round(ratio*b) original + the rest generated rows (exact per batch, DESIGN.md)."""
    for _ in range(steps):
        idx = original.next_indices()
        parts_x, parts_y = [images[idx]], [labels[idx]]
        if generated is not None:
            gx, gy = generated.next_batch()
            parts_x.append(gx)
            parts_y.append(gy)
        yield np.concatenate(parts_x), np.concatenate(parts_y)

