"""Randomized-smoothing certification: CERTIFY of Cohen, Rosenfeld & Kolter 2019, as used by Sehwag et al. 2022 (§3.3).

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) is certified at x with L2 radius
sigma * Phi^-1(pA_lower) when a one-sided (1 - alpha) lower confidence bound pA_lower on the top-class
probability exceeds 1/2 (Cohen et al. Thm. 1). The class is *selected* from n0 noisy samples and its
probability *estimated* from n fresh ones, so the selection cannot bias the bound. Noise is added in [0, 1]
pixel space (normalization lives inside the model); the noisy images are not clipped, as in Cohen et al.
Sehwag et al. 2022 uses sigma = 0.25, n0 = 100, n = 10,000, alpha = 0.001 (config `eval.certify_*`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.stats import beta, norm
from torch import nn

from raylab.eval.metrics import (EvalError, batch_slices, check_batch_size, check_images, model_device,
                                 require_eval_mode)

ABSTAIN = -1


def pa_lower_bound(count: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level 1 - alpha on a binomial proportion (count successes of n).

    Equals Cohen et al.'s `proportion_confint(count, n, alpha=2 * alpha, method="beta")[0]`; it is alpha^(1/n)
    when every sample hits, and 0 when none does.
    """
    return 0.0 if count == 0 else float(beta.ppf(alpha, count, n - count + 1))


@torch.no_grad()
def sample_counts(model: nn.Module, x: torch.Tensor, *, sigma: float, num: int, batch_size: int,
                  generator: torch.Generator, num_classes: int) -> np.ndarray:
    """Class counts of f(x + sigma * eps) over `num` Gaussian draws for one image x (C, H, W)."""
    device = model_device(model)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    x = x.to(device)
    for s in batch_slices(num, batch_size):
        # Noise from the caller's generator on its own device, so a CPU generator gives the same draws anywhere.
        noise = torch.randn((s.stop - s.start, *x.shape), generator=generator, device=generator.device)
        logits = model(x.unsqueeze(0) + sigma * noise.to(device=device, dtype=x.dtype))
        if logits.shape[1] != num_classes:
            raise EvalError(f"certify num_classes: {num_classes} but the model outputs {logits.shape[1]} logits")
        counts += torch.bincount(logits.argmax(1).cpu(), minlength=num_classes)
    return counts.numpy()


def certify_one(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                batch_size: int, generator: torch.Generator, num_classes: int) -> tuple[int, float]:
    """CERTIFY (Cohen et al. 2019, Alg. "certify") for one image: (class or ABSTAIN, certified L2 radius)."""
    draw = dict(sigma=sigma, batch_size=batch_size, generator=generator, num_classes=num_classes)
    top = int(np.argmax(sample_counts(model, x, num=n0, **draw)))
    p_lower = pa_lower_bound(int(sample_counts(model, x, num=n, **draw)[top]), n, alpha)
    if p_lower <= 0.5:
        return ABSTAIN, 0.0
    return top, sigma * float(norm.ppf(p_lower))


def _check_certify_args(sigma: float, n0: int, n: int, alpha: float, num_classes: int) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise EvalError(f"certify sigma: {sigma!r} must be a finite number > 0")
    for what, value, lo in (("n0", n0, 1), ("n", n, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise EvalError(f"certify {what}: {value!r} must be an integer >= {lo}")
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise EvalError(f"certify alpha: {alpha!r} must be a float in (0, 1)")


def certify(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, batch_size: int, generator: torch.Generator,
            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Certify each image of x (float NCHW in [0, 1]).

    Returns (predictions int64 with ABSTAIN = -1, radii float64 with 0 where abstained). Images are processed in
    order with draws from `generator`, so results are reproducible for a given generator state and batch size.
    """
    require_eval_mode(model)
    check_images(x)
    check_batch_size(batch_size)
    _check_certify_args(sigma, n0, n, alpha, num_classes)
    out = [certify_one(model, xi, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                       generator=generator, num_classes=num_classes) for xi in x]
    preds = np.array([p for p, _ in out], dtype=np.int64)
    radii = np.array([r for _, r in out], dtype=np.float64)
    return preds, radii


def certified_accuracy_curve(preds: np.ndarray, radii: np.ndarray, labels: np.ndarray | torch.Tensor,
                             radii_grid: Sequence[float]) -> list[tuple[float, float]]:
    """[(r, fraction of images predicted correctly with certified radius >= r), ...] (Sehwag et al. 2022 Fig. 2)."""
    preds, radii, labels = np.asarray(preds), np.asarray(radii), np.asarray(labels)
    if not (preds.shape == radii.shape == labels.shape and preds.ndim == 1 and preds.size):
        raise EvalError(f"certified_accuracy_curve: preds, radii, labels must be equal non-empty 1-D arrays "
                        f"(got shapes {preds.shape}, {radii.shape}, {labels.shape})")
    correct = preds == labels
    return [(float(r), float((correct & (radii >= r)).mean())) for r in radii_grid]
