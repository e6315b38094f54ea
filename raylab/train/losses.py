"""Training losses keyed by the config's `train.loss`: "trades", "pgd_at", "ce", "stability". Pure torch.

Every loss is `loss_fn(model, x, y, *, cfg: TrainConfig, attack: AttackConfig, generator) -> (loss, stats)`:
x (N, 3, H, W) in [0, 1]; y int64 labels (N,) or soft targets (N, K) from MixUp/CutMix; the model in the train
mode the caller set; `generator` feeds every random draw (random starts, noise). `stats` holds detached
`logits_clean`, `logits_adv` (attacked or noisy inputs' logits), `x_adv` and the scalar loss terms.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raylab.attacks.ops import draw
from raylab.attacks.pgd import ATTACK_MODES, eval_mode, pgd
from raylab.config import AttackConfig, TrainConfig
from raylab.precision import ATTACK_PRECISION
from raylab.train.ema import unwrap

Tensor = torch.Tensor
Stats = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Stats]]


class LossConfigError(ValueError):
    """A one-line message naming the bad loss setting and what is allowed."""


LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def decorate(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn
    return decorate


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise LossConfigError(f"train.loss: {name!r} is not one of {', '.join(LOSSES)}")
    return LOSSES[name]


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.

def smooth_ce(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Label-smoothed cross-entropy, batch mean: (1 - s) * NLL(target) + s * mean_k(-log p_k).

    As the reference's `SmoothCrossEntropyLoss` (training_recipe.md §1, `--ls`). `target` is int64 labels (N,)
    or soft probabilities (N, K) (MixUp/CutMix); for one-hot soft targets both give the same value.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise LossConfigError(f"train.label_smoothing: {smoothing} must be in [0, 1]")
    if target.dim() == 1 and not target.is_floating_point():
        log_p = F.log_softmax(logits.float(), dim=1)
        nll = -log_p.gather(1, target[:, None]).squeeze(1)
    elif target.shape == logits.shape and target.is_floating_point():
        log_p = F.log_softmax(logits.float(), dim=1)
        nll = -(target.float() * log_p).sum(dim=1)
    else:
        raise LossConfigError(f"loss target: shape {tuple(target.shape)} {target.dtype} must be int labels "
                              f"({logits.shape[0]},) or float probabilities {tuple(logits.shape)}")
    return ((1.0 - smoothing) * nll - smoothing * log_p.mean(dim=1)).mean()


def kl_to(logits: Tensor, target_logits: Tensor) -> Tensor:
    """KL(softmax(target_logits) || softmax(logits)), batchmean; gradients flow into both arguments."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.softmax(target_logits.float(), dim=1),
                    reduction="batchmean")


def _require_beta(cfg: TrainConfig, loss: str) -> float:
    # The reference turns a missing --beta into Madry PGD-AT without a word (training_recipe.md §4.4).
    if cfg.beta is None:
        raise LossConfigError(f"train.beta: required by train.loss={loss} (got None; raylab never falls back "
                              "to PGD-AT)")
    return cfg.beta


def _attack(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, attack: AttackConfig,
            generator: Optional[torch.Generator], objective: str, ref_logits: Optional[Tensor] = None) -> Tensor:
    """PGD with the config's budget, random start, under the BN mode `train.attack_bn` and the passes' precision
    `attack.precision` (raylab.precision; the perturbation arithmetic is fp32 either way).

    The attack runs on the bare module, never through DDP: its input-gradient passes must not arm DDP's gradient
    all-reduce (which then waits for a parameter backward that never comes) nor broadcast BN buffers."""
    if cfg.attack_bn not in ATTACK_MODES:
        raise LossConfigError(f"train.attack_bn: {cfg.attack_bn!r} is not one of {', '.join(ATTACK_MODES)}")
    model = unwrap(model)
    with ATTACK_MODES[cfg.attack_bn](model), ATTACK_PRECISION[attack.precision](x.device.type):
        return pgd(model, x, y, norm=attack.norm, eps=attack.eps, step=attack.step, steps=attack.steps,
                   objective=objective, generator=generator, ref_logits=ref_logits, random_start=True)


def _eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    model = unwrap(model)
    with torch.no_grad(), eval_mode(model):
        return model(x)


# Clean logits that TRADES' inner KL aims away from, per `train.attack_bn`. In train_frozen mode they equal the
# outer clean forward's logits (train-mode BN normalizes with batch statistics either way; only the running-stat
# update differs), so reusing them saves the reference's extra forward (1 of ~27 forward-equivalents of a
# TRADES-10 step, an estimate) at the same peak memory (the outer phase holds two graphs anyway).
# Original TRADES ("eval") takes them in eval mode.
RefLogits = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, outer clean logits) -> detached target
_TRADES_REF: dict[str, RefLogits] = {
    "train_frozen": lambda model, x, logits_clean: logits_clean.detach(),
    "eval": lambda model, x, logits_clean: _eval_logits(model, x),
}


def _stats(logits_clean: Tensor, logits_adv: Tensor, x_adv: Tensor, **terms: Tensor) -> Stats:
    out = {"logits_clean": logits_clean.detach(), "logits_adv": logits_adv.detach(), "x_adv": x_adv.detach()}
    out.update({name: value.detach() for name, value in terms.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The losses.

@register_loss("trades")
def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, cfg: TrainConfig, attack: AttackConfig,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Stats]:
    """TRADES (Zhang et al. 2019) as in the reference (training_recipe.md §1):
    smooth_ce(f(x), y, ls) + beta * KL(softmax(f(x)) || softmax(f(x_adv))), the clean side NOT detached;
    x_adv maximizes KL to the detached clean softmax from a uniform random start. The two outer forwards (clean,
    then adversarial) run in the caller's train mode and update BN running stats; attack forwards do not."""
    beta = _require_beta(cfg, "trades")
    if cfg.attack_bn not in _TRADES_REF:
        raise LossConfigError(f"train.attack_bn: {cfg.attack_bn!r} is not one of {', '.join(_TRADES_REF)}")
    logits_clean = model(x)
    ref = _TRADES_REF[cfg.attack_bn](model, x, logits_clean)
    x_adv = _attack(model, x, y, cfg, attack, generator, "kl", ref_logits=ref)
    logits_adv = model(x_adv)
    natural = smooth_ce(logits_clean, y, cfg.label_smoothing)
    robust = kl_to(logits_adv, logits_clean)
    loss = natural + beta * robust
    return loss, _stats(logits_clean, logits_adv, x_adv, loss_natural=natural, loss_robust=robust)


@register_loss("pgd_at")
def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, cfg: TrainConfig, attack: AttackConfig,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Stats]:
    """Madry et al. 2018: smooth_ce on PGD (CE objective) examples. The clean logits are reporting only: one
    no-grad forward in the attack's BN mode, so running stats see only the adversarial batch, as in Madry."""
    x_adv = _attack(model, x, y, cfg, attack, generator, "ce")
    bare = unwrap(model)
    with torch.no_grad(), ATTACK_MODES[cfg.attack_bn](bare):
        logits_clean = bare(x)
    logits_adv = model(x_adv)
    loss = smooth_ce(logits_adv, y, cfg.label_smoothing)
    return loss, _stats(logits_clean, logits_adv, x_adv, loss_robust=loss)


@register_loss("ce")
def ce_loss(model: nn.Module, x: Tensor, y: Tensor, *, cfg: TrainConfig, attack: AttackConfig,
            generator: Optional[torch.Generator] = None) -> tuple[Tensor, Stats]:
    """Standard training (the scorer classifier). No attack: `logits_adv` and `x_adv` are the clean ones."""
    logits = model(x)
    loss = smooth_ce(logits, y, cfg.label_smoothing)
    return loss, _stats(logits, logits, x, loss_natural=loss)


@register_loss("stability")
def stability_loss(model: nn.Module, x: Tensor, y: Tensor, *, cfg: TrainConfig, attack: AttackConfig,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Stats]:
    """Stability training for randomized smoothing (Sehwag et al. 2022 §3.2, Zheng et al. 2016):
    smooth_ce(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x + delta))), delta ~ N(0, sigma^2 I) with
    sigma = train.noise_sigma, drawn from `generator`; not clamped to [0, 1] (Cohen et al. smooth unclamped)."""
    beta = _require_beta(cfg, "stability")
    x_noisy = x + cfg.noise_sigma * draw(torch.randn, x.shape, x, generator)
    logits_clean = model(x)
    logits_noisy = model(x_noisy)
    natural = smooth_ce(logits_clean, y, cfg.label_smoothing)
    robust = kl_to(logits_noisy, logits_clean)
    loss = natural + beta * robust
    return loss, _stats(logits_clean, logits_noisy, x_noisy, loss_natural=natural, loss_robust=robust)
