"""Clean and PGD accuracy of a classifier: the papers' validation metrics, as pure functions.

Every function takes the model, images `x` (float, NCHW, in [0, 1]; normalization lives inside the model) and
labels `y` (int64), an explicit batch size and, where randomness is involved, a `torch.Generator`; none reads a
global or touches the global RNG. Per-example flags are returned on the CPU so shards can be concatenated exactly
(`*_flags`); the accuracies are their means.

PGD-40 follows Rebuffi et al. 2021 App. A / Rice et al. 2020 as used for early stopping in Wang et al. 2023 and
Rebuffi et al. 2021: 40 steps of the margin (CW) loss, one uniform random start, step eps/4 (= 2/255 at L-inf 8/255).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from raylab.attacks import NORMS, OBJECTIVES, pgd
from raylab.attacks.pgd import default_step


class EvalError(ValueError):
    """A one-line message naming the bad evaluation argument and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Guards: bad input fails in one line before any compute.

def require_eval_mode(model: nn.Module) -> None:
    """Refuse a model in train mode: BN statistics and dropout would change under attack (never silently switched)."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise EvalError(f"model: {training[0]!r} is in train mode; call model.eval() before evaluating")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size: {batch_size!r} must be an integer >= 1")


def check_images(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """x: float NCHW in [0, 1]; y: int64 labels, one per image."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise EvalError(f"x: expected a float tensor of shape (N, C, H, W), got {_describe(x)}")
    if x.numel() and (x.min().item() < 0.0 or x.max().item() > 1.0):
        raise EvalError(f"x: values must lie in [0, 1] (got [{x.min().item():.3g}, {x.max().item():.3g}]); "
                        "normalization belongs inside the model")
    if y is None:
        return
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise EvalError(f"y: expected an int64 tensor of shape ({x.shape[0]},), got {_describe(y)}")


def check_eps(eps: float, what: str = "eps") -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise EvalError(f"{what}: {eps!r} must be a finite number >= 0")


def check_choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise EvalError(f"{what}: {value!r} is not one of {', '.join(allowed)}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


# ---------------------------------------------------------------------------------------------------------------
# Batching helpers (one place, used by every metric).

def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a parameter-free model): batches are moved there."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Arg-max class of each image (int64, CPU)."""
    device = model_device(model)
    return torch.cat([model(x[s].to(device)).argmax(1).cpu() for s in batch_slices(len(x), batch_size)]
                     or [torch.empty(0, dtype=torch.int64)])


# ---------------------------------------------------------------------------------------------------------------
# Metrics.

def correct_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Per-example bool: the clean image is classified correctly."""
    require_eval_mode(model)
    check_images(x, y)
    check_batch_size(batch_size)
    return predict(model, x, batch_size=batch_size) == y.cpu()


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int) -> float:
    return _mean(correct_flags(model, x, y, batch_size=batch_size))


def pgd_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
              step: float | None = None, steps: int = 40, objective: str = "margin", batch_size: int,
              generator: torch.Generator | None = None, random_start: bool = True,
              start: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example bool: correct on the clean image AND on its PGD adversarial example.

    The clean image is itself a point of the eps-ball, so a point misclassified clean is never robust, whatever the
    attack returned. `step` defaults to `attacks.pgd.default_step` (2/255 at L-inf 8/255, the papers' PGD-40; 2·eps/steps at L2).
    The random start comes from `generator`, batch by batch, or from `start` (`random_starts` of the whole set,
    sliced as x was): then an image's result does not depend on the slice or the batch it was attacked in.
    """
    require_eval_mode(model)
    check_images(x, y)
    check_batch_size(batch_size)
    check_eps(eps)
    check_choice("norm", norm, NORMS)
    check_choice("objective", objective, OBJECTIVES)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EvalError(f"steps: {steps!r} must be an integer >= 1")
    _check_start(x, start, generator, random_start)
    step = default_step(norm, eps, steps) if step is None else step
    check_eps(step, "step")
    device = model_device(model)
    flags = []
    for s in batch_slices(len(x), batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        x_adv = pgd(model, xb, yb, norm=norm, eps=eps, step=step, steps=steps, objective=objective,
                    generator=generator, random_start=random_start, start=None if start is None else start[s])
        with torch.no_grad():
            flags.append(((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb)).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def random_starts(x: torch.Tensor, *, norm: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    """The PGD random start of every image of x, drawn at once (x's shape): ranks that draw it from the same seed
    and attack slices of x with the matching slices of it (`pgd_flags(start=...)`) give each image the start it
    gets when one device attacks the whole set."""
    check_images(x)
    check_eps(eps)
    check_choice("norm", norm, NORMS)
    return NORMS[norm].init(x, eps, generator)


def _check_start(x: torch.Tensor, start: torch.Tensor | None, generator: torch.Generator | None,
                 random_start: bool) -> None:
    if start is not None and (not isinstance(start, torch.Tensor) or start.shape != x.shape):
        raise EvalError(f"start: expected one random start per image, shape {tuple(x.shape)}, got {_describe(start)}")
    if random_start and start is None and generator is None:
        raise EvalError("generator: the random start needs a torch.Generator (or start=random_starts(...))")


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                 step: float | None = None, steps: int = 40, objective: str = "margin", batch_size: int,
                 generator: torch.Generator, random_start: bool = True) -> float:
    """Robust accuracy under PGD (default: the papers' PGD-40, margin loss, one random start)."""
    return _mean(pgd_flags(model, x, y, norm=norm, eps=eps, step=step, steps=steps, objective=objective,
                           batch_size=batch_size, generator=generator, random_start=random_start))


def _mean(flags: torch.Tensor) -> float:
    if flags.numel() == 0:
        raise EvalError("x: no images to evaluate (N = 0)")
    return flags.float().mean().item()


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n images (Wilson 1927): unlike the normal
    approximation it stays inside [0, 1] and is honest near 0% and 100%, where small test sets put toy models."""
    if n <= 0 or not math.isfinite(accuracy):
        return math.nan, math.nan
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def format_accuracy(accuracy: float, n: int) -> str:
    """'84.00 [79.5, 87.7]': the accuracy in percent with its 95% Wilson interval over n images."""
    if not math.isfinite(accuracy):
        return "-"
    low, high = wilson_interval(accuracy, n)
    return f"{100 * accuracy:.2f} [{100 * low:.1f}, {100 * high:.1f}]"
