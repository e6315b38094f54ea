"""Gradient-masking checks of Rebuffi et al. 2021 App. C (Fig. 10), as pure functions returning data and a verdict.

* `accuracy_vs_eps`: robust accuracy under a gradient attack as the radius grows from 0 to 64/255. A model whose
  gradients are informative is broken almost everywhere at large radii; accuracy that stays high, or that rises
  with the radius, means the attack is being defeated rather than the model being robust (Athalye et al. 2018).
* `accuracy_vs_steps`: robust accuracy as the number of attack steps grows (5 ... 1000 in the paper). It should
  fall then plateau; more steps *raising* accuracy beyond noise means the attack is not converging.

The paper's attack is APGD-CE with 1 restart (`attack="apgd-ce"`); raylab's PGD with the margin loss is the
cheaper alternative (`attack="pgd"`). Every point of a sweep starts from the same seed (common random numbers),
so differences between points come from eps or steps, not from the random start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from raylab.eval.autoattack import apgd_ce_flags
from raylab.eval.metrics import EvalError, check_eps, pgd_flags

DEFAULT_EPS = tuple(k / 255 for k in (0, 2, 4, 8, 16, 32, 64))  # Fig. 10(a): 0 ... 64/255
DEFAULT_STEPS = (5, 10, 20, 50, 100)                              # Fig. 10(b) goes on to 1000


@dataclass(frozen=True)
class CheckReport:
    """One check: accuracy `accs[i]` at `xs[i]` (eps or steps), the verdict and a one-line explanation."""
    name: str
    xs: tuple[float, ...]
    accs: tuple[float, ...]
    passed: bool
    message: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Attacks a check can sweep: (model, x, y, *, norm, eps, steps, seed, batch_size) -> per-example robust flags.

AttackFlags = Callable[..., torch.Tensor]
CHECK_ATTACKS: dict[str, AttackFlags] = {}


def register_check_attack(name: str) -> Callable[[AttackFlags], AttackFlags]:
    def decorate(fn: AttackFlags) -> AttackFlags:
        CHECK_ATTACKS[name] = fn
        return fn
    return decorate


@register_check_attack("apgd-ce")
def _apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int, seed: int,
             batch_size: int) -> torch.Tensor:
    return apgd_ce_flags(model, x, y, norm=norm, eps=eps, steps=steps, seed=seed, batch_size=batch_size)


@register_check_attack("pgd")
def _pgd_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int,
                seed: int, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same start on any accelerator
    return pgd_flags(model, x, y, norm=norm, eps=eps, steps=steps, objective="margin", batch_size=batch_size,
                     generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces.

def _sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, points: Sequence[tuple[float, int]], *,
           attack: str, norm: str, seed: int, batch_size: int) -> tuple[float, ...]:
    """Robust accuracy at each (eps, steps) point, each from the same seed."""
    if attack not in CHECK_ATTACKS:
        raise EvalError(f"check attack: {attack!r} is not one of {', '.join(CHECK_ATTACKS)}")
    run = CHECK_ATTACKS[attack]
    return tuple(run(model, x, y, norm=norm, eps=eps, steps=steps, seed=seed, batch_size=batch_size)
                 .float().mean().item() for eps, steps in points)


def _default_tolerance(n: int) -> float:
    """Noise allowance: 1 point of accuracy, or two examples on a small set."""
    return max(0.01, 2.0 / n)


def _rises(xs: Sequence[float], accs: Sequence[float], tolerance: float) -> list[str]:
    """Points where accuracy exceeds the lowest accuracy seen at any smaller x by more than `tolerance`."""
    rises = []
    for i in range(1, len(accs)):
        floor = min(accs[:i])
        if accs[i] > floor + tolerance:
            rises.append(f"{xs[i]:.4g} ({accs[i]:.1%} > {floor:.1%})")
    return rises


def _check_increasing(what: str, values: Sequence[float]) -> None:
    if not values or any(b <= a for a, b in zip(values, values[1:])) or min(values) < 0:
        raise EvalError(f"{what}: {list(values)} must be a non-empty, strictly increasing list of values >= 0")


# ---------------------------------------------------------------------------------------------------------------
# The checks.

def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_list: Sequence[float] = DEFAULT_EPS,
                    norm: str = "linf", attack: str = "apgd-ce", steps: int = 100, seed: int = 0, batch_size: int,
                    max_final_acc: float = 0.05, tolerance: float | None = None) -> CheckReport:
    """Fig. 10(a): passes when accuracy at the largest eps is <= `max_final_acc` and never rises with eps."""
    _check_increasing("accuracy_vs_eps eps_list", eps_list)
    for eps in eps_list:
        check_eps(eps)
    accs = _sweep(model, x, y, [(eps, steps) for eps in eps_list], attack=attack, norm=norm, seed=seed,
                  batch_size=batch_size)
    rises = _rises(eps_list, accs, _default_tolerance(len(x)) if tolerance is None else tolerance)
    problems = [f"accuracy {accs[-1]:.1%} at eps {eps_list[-1]:.4g} is above {max_final_acc:.1%}"] \
        if accs[-1] > max_final_acc else []
    problems += [f"accuracy rises with eps at {', '.join(rises)}"] if rises else []
    message = "; ".join(problems) + " (gradient masking?)" if problems else \
        f"accuracy falls to {accs[-1]:.1%} at eps {eps_list[-1]:.4g}"
    return CheckReport("accuracy_vs_eps", tuple(map(float, eps_list)), accs, not problems, message)


def accuracy_vs_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      steps_list: Sequence[int] = DEFAULT_STEPS, norm: str = "linf", eps: float = 8 / 255,
                      attack: str = "apgd-ce", seed: int = 0, batch_size: int,
                      tolerance: float | None = None) -> CheckReport:
    """Fig. 10(b): passes when more steps never raise accuracy by more than `tolerance` (default: noise)."""
    _check_increasing("accuracy_vs_steps steps_list", steps_list)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps_list):
        raise EvalError(f"accuracy_vs_steps steps_list: {list(steps_list)} must be integers >= 1")
    check_eps(eps)
    accs = _sweep(model, x, y, [(eps, k) for k in steps_list], attack=attack, norm=norm, seed=seed,
                  batch_size=batch_size)
    rises = _rises(steps_list, accs, _default_tolerance(len(x)) if tolerance is None else tolerance)
    message = f"more steps raise accuracy at {', '.join(rises)} (attack not converging?)" if rises else \
        f"accuracy settles at {accs[-1]:.1%} after {steps_list[-1]} steps"
    return CheckReport("accuracy_vs_steps", tuple(map(float, steps_list)), accs, not rises, message)


CHECKS: dict[str, Callable[..., CheckReport]] = {"accuracy_vs_eps": accuracy_vs_eps,
                                                  "accuracy_vs_steps": accuracy_vs_steps}
