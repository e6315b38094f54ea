"""Learning-rate (and momentum) schedules as pure functions of a tick, plus a resumable driver.

A *tick* is the unit the schedule advances in: one epoch when ``train.schedule_per="epoch"`` (the reference's
``cosinew``, reference/training_recipe.md §1: the LR is constant within an epoch), one optimizer step when
``"step"``. The trainer calls `Schedule.step()` once per optimizer step either way; the driver converts steps to
ticks, so the granularity is a config choice and not a property of the training loop.

Every shape is ``factor(t, total, warmup_frac) -> multiplier of the peak LR`` for tick ``t`` of ``total`` ticks,
so formulas are testable without an optimizer. Registered shapes (keys = config ``train.scheduler``):

- ``onecycle``: torch ``OneCycleLR(max_lr=lr, pct_start=warmup_frac, total_steps=total)`` written out
  (defaults div_factor 25, final_div_factor 1e4, cosine annealing): cosine warm-up lr/25 -> lr ending at tick
  ``warmup_frac*total - 1``, then cosine decay to lr/25/1e4. With momentum cycling 0.95 -> 0.85 (at the peak) ->
  0.95, OneCycleLR's default ``cycle_momentum=True`` that the reference inherits: its effective momentum is not
  the 0.9 passed to SGD.
- ``cosine``: optional linear warm-up over ``ceil(warmup_frac*total)`` ticks, then cosine decay from lr to 0 at
  tick ``total`` (torch ``CosineAnnealingLR(T_max=total)`` when warmup_frac=0; Rebuffi et al. 2021, App. A).
- ``constant``: the peak LR throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from raylab.config import TrainConfig
from raylab.knobs import ConfigError

Shape = Callable[[float, int, float], float]

# OneCycleLR defaults (torch.optim.lr_scheduler.OneCycleLR), which the reference never overrides.
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4
ONECYCLE_MOMENTUM = (0.95, 0.85)  # (max_momentum at the ends, base_momentum at the peak)


def cosine_anneal(start: float, end: float, pct: float) -> float:
    """Half-cosine from `start` (pct=0) to `end` (pct=1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _onecycle_phase(t: float, total: int, warmup_frac: float) -> tuple[int, float]:
    """(phase, pct) exactly as OneCycleLR splits its steps: phase 0 ends at tick warmup_frac*total - 1.

    For a small total that boundary is fractional or negative, and OneCycleLR then starts below the peak; we
    keep that behaviour so a per-epoch schedule equals the reference's for any epoch count.
    """
    t = min(float(t), total - 1.0)  # past the end: hold the final value (OneCycleLR would raise)
    end0, end1 = warmup_frac * total - 1.0, total - 1.0
    if t <= end0:
        return 0, (t / end0 if end0 > 0 else 1.0)
    return 1, ((t - end0) / (end1 - end0) if end1 > end0 else 1.0)


def onecycle_factor(t: float, total: int, warmup_frac: float) -> float:
    phase, pct = _onecycle_phase(t, total, warmup_frac)
    low, final = 1.0 / ONECYCLE_DIV, 1.0 / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    return cosine_anneal(low, 1.0, pct) if phase == 0 else cosine_anneal(1.0, final, pct)


def onecycle_momentum(t: float, total: int, warmup_frac: float) -> float:
    phase, pct = _onecycle_phase(t, total, warmup_frac)
    hi, lo = ONECYCLE_MOMENTUM
    return cosine_anneal(hi, lo, pct) if phase == 0 else cosine_anneal(lo, hi, pct)


def cosine_factor(t: float, total: int, warmup_frac: float) -> float:
    warm = math.ceil(warmup_frac * total)
    if t < warm:  # linear warm-up reaching the peak at tick warm-1 (like onecycle's peak tick)
        return (t + 1.0) / warm
    peak = max(warm - 1, 0)  # the decay starts from the peak tick, so the peak is not held twice
    return cosine_anneal(1.0, 0.0, min((t - peak) / max(total - peak, 1), 1.0))


def constant_factor(t: float, total: int, warmup_frac: float) -> float:
    return 1.0


@dataclass(frozen=True)
class ScheduleShape:
    lr: Shape
    momentum: Optional[Shape] = None  # None: momentum stays at the optimizer's value


SCHEDULES: dict[str, ScheduleShape] = {}


def register_schedule(name: str, momentum: Optional[Shape] = None):
    """Decorator: register an LR shape (and optional momentum shape) under a config name."""
    def wrap(fn: Shape) -> Shape:
        SCHEDULES[name] = ScheduleShape(fn, momentum)
        return fn
    return wrap


register_schedule("onecycle", momentum=onecycle_momentum)(onecycle_factor)
register_schedule("cosine")(cosine_factor)
register_schedule("constant")(constant_factor)


class Schedule:
    """Sets each param group's lr (= its ``peak_lr`` times the shape) and, where cycled, its momentum.

    Call `step()` once after every optimizer step. The LR for the first step is set at construction.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shape: ScheduleShape, *, total_ticks: int,
                 steps_per_tick: int, warmup_frac: float) -> None:
        self.optimizer, self.shape = optimizer, shape
        self.total_ticks, self.steps_per_tick, self.warmup_frac = total_ticks, steps_per_tick, warmup_frac
        self.num_steps = 0
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
        # momentum 0 means plain SGD: cycling it would silently switch momentum on
        self.cycle_momentum = shape.momentum is not None and all(
            g.get("momentum", 0.0) > 0 for g in optimizer.param_groups)
        self._apply()

    @property
    def tick(self) -> int:
        return self.num_steps // self.steps_per_tick

    def lr_factor(self) -> float:
        return self.shape.lr(self.tick, self.total_ticks, self.warmup_frac)

    def last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def _apply(self) -> None:
        factor = self.lr_factor()
        momentum = (self.shape.momentum(self.tick, self.total_ticks, self.warmup_frac)
                    if self.cycle_momentum else None)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
            if momentum is not None:
                group["momentum"] = momentum

    def step(self) -> None:
        self.num_steps += 1
        if self.num_steps % self.steps_per_tick == 0:  # per-epoch: the LR changes only at epoch boundaries
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "total_ticks": self.total_ticks, "steps_per_tick": self.steps_per_tick}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["total_ticks"], state["steps_per_tick"]) != (self.total_ticks, self.steps_per_tick):
            raise ValueError(f"schedule state: saved for {state['total_ticks']} ticks of {state['steps_per_tick']} "
                             f"steps, this run has {self.total_ticks} of {self.steps_per_tick}")
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule named by ``cfg.scheduler``, advancing per epoch or per step (``cfg.schedule_per``)."""
    if cfg.scheduler not in SCHEDULES:
        raise ConfigError(f"train.scheduler: {cfg.scheduler!r} is not one of {', '.join(SCHEDULES)}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: {steps_per_epoch} must be >= 1")
    per_epoch = cfg.schedule_per == "epoch"
    return Schedule(optimizer, SCHEDULES[cfg.scheduler],
                    total_ticks=cfg.epochs if per_epoch else cfg.epochs * steps_per_epoch,
                    steps_per_tick=steps_per_epoch if per_epoch else 1, warmup_frac=cfg.warmup_frac)
