"""Model weight averaging (WA/EMA) as the reference does it, with the BN-statistics handling fixed.

reference/training_recipe.md §1 "EMA / weight averaging": after every optimizer step the averaged copy is updated
on *parameters* with decay 0 (a plain copy) until the warm-up ends, then decay = min(tau, (1+d)/(10+d)) with d the
steps since the warm-up ended (the Gowal et al. 2020 ramp; tau 0.995 with generated data, 0.999 without: Rebuffi
et al. 2021 §6.1). Evaluation uses the averaged model.

BN buffers (``train.ema_bn``; recipe §4 item 5: the reference *aliases* the live model's running stats):
- ``copy``: the reference's semantics, but the values are copied, so the averaged model owns its buffers;
- ``average``: floating-point buffers (BN running_mean/var) get the same EMA as the parameters;
- ``recompute``: buffers are copied on update (so they are always valid) and `recompute_bn` re-estimates them on
  the averaged weights from a few batches before evaluation (SWA-style, Izmailov et al. 2018).
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from raylab.config import TrainConfig
from raylab.knobs import ConfigError

BN_POLICIES = ("copy", "average", "recompute")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_decay(step: int, tau: float, warmup_steps: int) -> float:
    """Decay used after optimizer step `step` (0-based): 0 in warm-up, then min(tau, (1+d)/(10+d))."""
    if step < warmup_steps:
        return 0.0
    delta = step - warmup_steps
    return min(tau, (1.0 + delta) / (10.0 + delta))


def _float_buffers(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floating-point buffers, other buffers) in registration order."""
    bufs = list(module.buffers())
    return [b for b in bufs if b.is_floating_point()], [b for b in bufs if not b.is_floating_point()]


class WeightAverage:
    """An averaged copy of a model (`.module`, eval mode, no grads), updated after each optimizer step."""

    def __init__(self, model: nn.Module, tau: float = 0.995, warmup_steps: int = 0, bn: str = "copy") -> None:
        if bn not in BN_POLICIES:
            raise ConfigError(f"train.ema_bn: {bn!r} is not one of {', '.join(BN_POLICIES)}")
        if not 0.0 <= tau <= 1.0 or warmup_steps < 0:
            raise ValueError(f"WeightAverage: tau={tau} must be in [0, 1] and warmup_steps={warmup_steps} >= 0")
        self.tau, self.warmup_steps, self.bn = tau, int(warmup_steps), bn
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)
        self._params = list(self.module.parameters())
        self._float_bufs, self._other_bufs = _float_buffers(self.module)
        self.num_updates = 0  # optimizer steps seen; the default `step` of update()
        self.last_decay: Optional[float] = None

    @classmethod
    def from_config(cls, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> "WeightAverage":
        """Warm-up = ema_warmup_frac * epochs * steps_per_epoch optimizer steps (recipe: 0.025 of training)."""
        warmup = math.ceil(cfg.ema_warmup_frac * cfg.epochs * steps_per_epoch)
        return cls(model, tau=cfg.ema_tau, warmup_steps=warmup, bn=cfg.ema_bn)

    def _live(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        live = unwrap(model)
        params = [p.detach() for p in live.parameters()]
        floats, others = _float_buffers(live)
        if len(params) != len(self._params) or len(floats) != len(self._float_bufs):
            raise ValueError(f"WeightAverage.update: model has {len(params)} parameters/{len(floats)} float "
                             f"buffers, the average {len(self._params)}/{len(self._float_bufs)}")
        return params, floats, others

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> float:
        """Fold the live model in after optimizer step `step` (default: the internal counter); returns the decay."""
        step = self.num_updates if step is None else int(step)
        decay = ema_decay(step, self.tau, self.warmup_steps)
        params, floats, others = self._live(model)
        blend(self._params, params, decay)
        blend(self._float_bufs, floats, decay if self.bn == "average" else 0.0)
        if others:  # num_batches_tracked: a counter, never averaged
            torch._foreach_copy_(self._other_bufs, others)
        self.num_updates, self.last_decay = step + 1, decay
        return decay

    def recompute_bn(self, batches: Iterable[Any]) -> None:
        """Re-estimate the averaged model's BN statistics from `batches` (policy ``recompute``)."""
        recompute_bn(self.module, batches)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "last_decay": self.last_decay,
                "tau": self.tau, "warmup_steps": self.warmup_steps, "bn": self.bn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights, buffers and counters (tau/warm-up/bn stay as constructed: they are config)."""
        self.module.load_state_dict(state["module"])
        self.num_updates, self.last_decay = int(state["num_updates"]), state.get("last_decay")


@torch.no_grad()
def blend(avg: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """avg <- decay*avg + (1-decay)*live over whole lists, the one EMA step of raylab (the classifier's
    `WeightAverage` and the EDM worker's EMA, Karras et al. 2022 App. F); decay 0 is an exact copy (lerp is not
    bit-exact)."""
    if not avg:
        return
    if decay == 0.0:
        torch._foreach_copy_(avg, live)
    else:
        torch._foreach_lerp_(avg, live, 1.0 - decay)


# ---------------------------------------------------------------------------------------------------------------
# BN re-estimation.

def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset BN running stats and re-estimate them as the equal-weight mean over `batches` of the batch statistics.

    The statistics are `torch.optim.swa_utils.update_bn`'s (train-mode forwards with momentum=None, PyTorch's
    cumulative average). It is not a drop-in on its own, so two things are kept around it: an empty `batches`
    raises before any statistic is reset (update_bn would leave them reset), and each module's own train/eval mode
    is restored afterwards, also on error (update_bn sets every module to the top module's former mode). A batch
    may be a tensor or a tuple/list whose first item is the input. Returns the number of batches used.
    """
    model = unwrap(model)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # checked before the statistics are reset
        raise ValueError("recompute_bn: no batches given")
    if not _bn_modules(model):
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in _bn_modules(model)}
    used = [0]

    def counted():
        for batch in itertools.chain([first], batches):
            used[0] += 1
            yield batch
    try:
        update_bn(counted(), model, device=next(model.parameters()).device)
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training  # per module: a submodule may have been in a different mode
    return used[0]
