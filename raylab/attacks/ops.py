"""Attack primitives, written once: random start, ascent step and projection per norm, and the [0, 1] clamp.

All work on batches of images x of shape (N, C, H, W) in [0, 1] and perturbations `delta` of the same shape;
norms are per sample. `NORMS[norm]` bundles (init, step, project) so PGD, TRADES' inner maximization and
validation attacks share one loop (aesthetics.md §6.3: torchattacks repeats these in 13 files).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

_TINY = 1e-12  # guards the division by a per-sample norm that can be exactly 0 (zero gradient, eps 0)


def clamp01(x: Tensor) -> Tensor:
    """Keep images in the valid pixel range [0, 1]."""
    return x.clamp(0.0, 1.0)


def _broadcast(v: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) so a per-sample value broadcasts against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped to broadcast against t."""
    return _broadcast(t.flatten(1).norm(p=2, dim=1), t)


def draw(kind: Callable[..., Tensor], shape: tuple[int, ...], like: Tensor,
          generator: Optional[torch.Generator]) -> Tensor:
    """`kind(shape)` (torch.rand / torch.randn) in fp32 from `generator` on the generator's own device (a CPU
    generator gives the same numbers whatever the accelerator), or from the global RNG when no generator is
    given; returned on `like`'s device and dtype."""
    device = generator.device if generator is not None else like.device
    noise = kind(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Linf: uniform start in the cube, signed-gradient step, coordinate-wise clipping (Madry et al. 2018).

def init_linf(x: Tensor, eps: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """delta ~ U(-eps, eps) per pixel (reference TRADES start, training_recipe.md §1)."""
    return (2.0 * draw(torch.rand, x.shape, x, generator) - 1.0) * eps


def step_linf(grad: Tensor, step: float) -> Tensor:
    return step * grad.sign()


def project_linf(delta: Tensor, eps: float) -> Tensor:
    return delta.clamp(-eps, eps)


# ---------------------------------------------------------------------------------------------------------------
# L2: uniform start in the ball, normalized-gradient step, radial projection.

def init_l2(x: Tensor, eps: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """delta uniform in the L2 ball of radius eps: Gaussian direction, radius eps * U^(1/d)."""
    direction = draw(torch.randn, x.shape, x, generator)
    direction = direction / _per_sample_norm(direction).clamp_min(_TINY)
    radius = eps * draw(torch.rand, x.shape[:1], x, generator).pow(1.0 / x[0].numel())
    return direction * _broadcast(radius, x)


def step_l2(grad: Tensor, step: float) -> Tensor:
    return step * grad / _per_sample_norm(grad).clamp_min(_TINY)


def project_l2(delta: Tensor, eps: float) -> Tensor:
    scale = (eps / _per_sample_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return delta * scale


# ---------------------------------------------------------------------------------------------------------------
# Registry keyed by the config's `attack.norm`.

@dataclass(frozen=True)
class NormOps:
    """The three per-norm pieces of a PGD iteration."""
    init: Callable[[Tensor, float, Optional[torch.Generator]], Tensor]  # (x, eps, generator) -> delta
    step: Callable[[Tensor, float], Tensor]                              # (grad, step) -> ascent increment
    project: Callable[[Tensor, float], Tensor]                           # (delta, eps) -> delta in the ball


NORMS: dict[str, NormOps] = {
    "linf": NormOps(init_linf, step_linf, project_linf),
    "l2": NormOps(init_l2, step_l2, project_l2),
}


def to_feasible(x: Tensor, delta: Tensor, eps: float, ops: NormOps) -> Tensor:
    """x + delta projected to the eps ball around x, then to [0, 1].

    Clamping after projecting keeps both constraints: with x in [0, 1], clamp01(x + d) - x shrinks every
    coordinate of d towards 0, which lowers any Lp norm.
    """
    return clamp01(x + ops.project(delta, eps))
