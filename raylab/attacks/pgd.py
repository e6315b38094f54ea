"""Projected gradient descent (Madry et al. 2018) with pluggable objective, plus the model-mode contexts.

One loop serves training PGD-10 (CE, for PGD-AT), TRADES' inner maximization (KL to the clean prediction,
Zhang et al. 2019) and validation PGD-40 (margin/CW loss, training_recipe.md §1 "Validation").

`pgd` never changes `model.training`: the caller picks the BN behaviour by entering `eval_mode(model)` or
`frozen_bn(model)` (the reference's `track_bn_stats(model, False)`: train mode, batch statistics, running
statistics untouched). `ATTACK_MODES` maps the config's `train.attack_bn` to them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylab.attacks.ops import NORMS, clamp01, to_feasible

Tensor = torch.Tensor


class AttackError(ValueError):
    """A one-line message naming the bad attack argument and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Objectives: (logits (N, C), labels (N,), ref_logits (N, C) or None) -> scalar to *maximize*.
# Sums over the batch, so a sample's gradient does not depend on the batch size (the steps are scale-free anyway).

Objective = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
OBJECTIVES: dict[str, Objective] = {}
_NEEDS_REF = {"kl"}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    def decorate(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn
    return decorate


@register_objective("ce")
def ce_objective(logits: Tensor, y: Tensor, ref_logits: Optional[Tensor]) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction="sum")


@register_objective("kl")
def kl_objective(logits: Tensor, y: Tensor, ref_logits: Optional[Tensor]) -> Tensor:
    """TRADES inner loss: KL(softmax(ref) || softmax(logits)), batchmean as the reference."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.softmax(ref_logits.float(), dim=1),
                    reduction="batchmean")


@register_objective("margin")
def margin_objective(logits: Tensor, y: Tensor, ref_logits: Optional[Tensor]) -> Tensor:
    """CW/margin loss: max_{j != y} z_j - z_y (> 0 exactly when the sample is misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (others.amax(dim=1) - true).sum()


# ---------------------------------------------------------------------------------------------------------------
# Model-mode contexts (the caller's choice; restored exactly on exit, exceptions included).

def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _restore_training(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Whole model in eval mode (original TRADES attack; evaluation); every module's flag restored after."""
    with _restore_training(model):
        model.eval()
        yield model


@contextlib.contextmanager
def frozen_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode with BN using batch statistics but never updating running stats or `num_batches_tracked`
    (the reference's TRADES attack, training_recipe.md §1). Setting `track_running_stats=False` in train mode
    makes BatchNorm pass no running buffers at all, so they stay bitwise unchanged; momentum=0 would not
    (num_batches_tracked still counts)."""
    bns = _bn_modules(model)
    tracked = [m.track_running_stats for m in bns]
    with _restore_training(model):
        model.train()
        try:
            for m in bns:
                m.track_running_stats = False
            yield model
        finally:
            for m, flag in zip(bns, tracked):
                m.track_running_stats = flag


ATTACK_MODES: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager]] = {
    "train_frozen": frozen_bn,
    "eval": eval_mode,
}


# ---------------------------------------------------------------------------------------------------------------
# PGD.

def _check_args(x: Tensor, y: Tensor, norm: str, eps: float, step: float, steps: int, objective: str,
                ref_logits: Optional[Tensor], start: Optional[Tensor] = None) -> None:
    """Every bad argument is reported before any forward pass."""
    if norm not in NORMS:
        raise AttackError(f"attack norm: {norm!r} is not one of {', '.join(NORMS)}")
    if objective not in OBJECTIVES:
        raise AttackError(f"attack objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not (eps >= 0 and step >= 0):
        raise AttackError(f"attack eps/step: {eps}/{step} must be >= 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise AttackError(f"attack steps: {steps!r} must be an int >= 0")
    if objective in _NEEDS_REF and (ref_logits is None or ref_logits.shape[0] != x.shape[0]):
        raise AttackError(f"attack objective {objective!r}: needs ref_logits (the detached clean logits, "
                          f"shape (N, C) with N={x.shape[0]})")
    soft_ok = objective != "margin" and y.dim() == 2 and y.is_floating_point()  # MixUp/CutMix targets
    if y.shape[:1] != x.shape[:1] or not (soft_ok or (y.dim() == 1 and not y.is_floating_point())):
        raise AttackError(f"attack labels: shape {tuple(y.shape)} {y.dtype} must be ({x.shape[0]},) int64 "
                          f"class indices{'' if objective == 'margin' else ' or (N, K) float probabilities'}")
    if start is not None and start.shape != x.shape:
        raise AttackError(f"attack start: shape {tuple(start.shape)} must be the images' {tuple(x.shape)}")


def default_step(norm: str, eps: float, steps: int) -> float:
    """The step when none is set. L-inf: eps/4, the papers' 2/255 at 8/255 (Wang et al. 2023; training_recipe.md
    §1). L2: 2·eps/steps, the reference's l2-pgd (training_recipe.md §1): at eps 128/255 and 10 steps that is ~6x
    the 2/255 once used for every norm."""
    return eps / 4 if norm == "linf" else 2 * eps / max(steps, 1)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps: float, step: Optional[float], steps: int,
        objective: str = "ce", generator: Optional[torch.Generator] = None, ref_logits: Optional[Tensor] = None,
        random_start: bool = True, start: Optional[Tensor] = None) -> Tensor:
    """Maximize `objective` over x' with ||x' - x||_norm <= eps and x' in [0, 1]; returns x' (detached).

    Args:
        model: maps (N, C, H, W) images in [0, 1] to logits (N, K); its mode is left as the caller set it.
        x: clean images (N, C, H, W) in [0, 1].
        y: labels (N,) int64, or soft targets (N, K) for "ce"; unused by "kl".
        norm: "linf" (signed steps, eps e.g. 8/255) or "l2" (normalized-gradient steps, eps e.g. 128/255).
        eps, step, steps: ball radius, step size (None: `default_step`) and number of gradient steps (steps=0:
            random start only).
        objective: "ce", "kl" (needs `ref_logits`, the detached clean logits) or "margin".
        generator: source of the random start; the global RNG is used only when it is None.
        random_start: start at a uniform point of the ball (clamped to [0, 1]) instead of at x.
        start: that point's perturbation (x's shape), drawn beforehand (`NORMS[norm].init` over a whole set, then
            sliced: an image's start then does not depend on how the set was split or batched); None: drawn here.
    Gradients are taken w.r.t. the input only; parameter `.grad`s are left untouched.
    """
    step = default_step(norm, eps, steps) if step is None else step
    _check_args(x, y, norm, eps, step, steps, objective, ref_logits, start)
    ops, loss_fn = NORMS[norm], OBJECTIVES[objective]
    x = x.detach()
    ref = ref_logits.detach() if ref_logits is not None else None
    if random_start:
        x_adv = clamp01(x + (ops.init(x, eps, generator) if start is None else start.to(x)))
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv), y, ref)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = to_feasible(x, x_adv.detach() + ops.step(grad, step) - x, eps, ops)
    return x_adv.detach()
