"""EDM sampler (Karras et al. 2022, Algorithm 2): Heun (or Euler) steps on ρ-spaced noise levels, optional churn.

A pure function: the network, the latents, the labels and a `noise_fn` for the churn noise come in; nothing reads
a global RNG, so images depend only on what the caller passes (per-image generators: `raylab.generate.seeds`).
The state is float64 throughout, as in the reference (edm.md §1); the network itself runs in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from raylab.config import GenerateConfig

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
SOLVERS = ("heun", "euler")


class SamplerError(ValueError):
    """A one-line message naming the bad sampler argument and what is allowed."""


def expected_nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per image: Heun corrects every step but the last (to σ = 0), so 2N − 1; Euler N."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def _check(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise SamplerError(f"num_steps: {num_steps!r} must be an int >= 1")
    if not 0 < sigma_min < sigma_max:
        raise SamplerError(f"sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise SamplerError(f"rho: {rho} must be > 0")


def sigma_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   net: Optional[nn.Module] = None) -> torch.Tensor:
    """t_0..t_{N-1} = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then t_N = 0 (EDM Eq. 5), float64.

    With `net`, σ_min/σ_max are first clamped to the network's range and each level goes through
    `net.round_sigma`. N = 1 gives [σ_max, 0].
    """
    if net is not None:
        sigma_min, sigma_max = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    _check(num_steps, sigma_min, sigma_max, rho)
    ramp = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if net is not None:
        t = torch.as_tensor(net.round_sigma(t), dtype=torch.float64)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def _denoiser(net: nn.Module, class_labels: Optional[torch.Tensor]) -> Callable:
    """D(x; σ) in float64, σ a 0-dim tensor shared by the batch."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, class_labels).to(torch.float64)
    return denoise


def _churn(x: torch.Tensor, t_cur: torch.Tensor, gamma: float, s_noise: float, noise_fn: Optional[NoiseFn],
           net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise the noise level t → t̂ = t(1+γ) by adding fresh noise of std √(t̂² − t²)·S_noise (Alg. 2 l. 5–6).

    With γ = 0 nothing is drawn (the reference draws and multiplies by 0; skipping changes no value).
    """
    if gamma == 0:
        return x, t_cur
    t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
    eps = noise_fn(x).to(device=x.device, dtype=torch.float64)
    return x + (t_hat ** 2 - t_cur ** 2).sqrt() * s_noise * eps, t_hat


@torch.no_grad()
def edm_sample(net: nn.Module, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
               num_steps: int = 18, solver: str = "heun", sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf,
               s_noise: float = 1.0, noise_fn: Optional[NoiseFn] = None) -> torch.Tensor:
    """Images (float64, roughly [-1, 1], the shape of `latents`) from unit-variance `latents` (Algorithm 2).

    `noise_fn(x)` must return standard normal noise shaped like x; it is required only when churn is on
    (s_churn > 0). The last step, to σ = 0, is plain Euler, so Heun costs `expected_nfe` = 2N − 1 evaluations.
    """
    if solver not in SOLVERS:
        raise SamplerError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    if s_churn > 0 and noise_fn is None:
        raise SamplerError("noise_fn: required when s_churn > 0 (the sampler never draws from a global RNG)")
    t_steps = sigma_schedule(num_steps, sigma_min, sigma_max, rho, net).to(latents.device)
    denoise = _denoiser(net, class_labels)
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1)
    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = gamma_max if s_min <= float(t_cur) <= s_max else 0.0
        x_hat, t_hat = _churn(x, t_cur, gamma, s_noise, noise_fn, net)
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if solver == "heun" and i < num_steps - 1:  # 2nd-order correction (trapezoid of the two slopes)
            d_next = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW → uint8 NHWC on the CPU: truncate(clip(127.5·x + 128, 0, 255)), the reference's rounding."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def sample_kwargs(cfg: GenerateConfig) -> dict[str, Any]:
    """The keyword arguments of `edm_sample` that `cfg` sets."""
    return dict(num_steps=cfg.steps, solver=cfg.solver, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                rho=cfg.rho, s_churn=cfg.s_churn, s_min=cfg.s_min, s_max=cfg.s_max, s_noise=cfg.s_noise)


class CountingNet(nn.Module):
    """Wraps a denoiser and counts calls and image-evaluations (tests and benchmarks measure NFE with it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls, self.image_evals = net, 0, 0
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        self.round_sigma = net.round_sigma

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls += 1
        self.image_evals += x.shape[0]
        return self.net(x, sigma, class_labels, augment_labels)
