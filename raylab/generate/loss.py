"""EDM training loss and the two schedules of its training loop (Karras et al. 2022 §5, edm.md §2).

Pure: σ and the noise come from the `torch.Generator` passed in; the caller reduces the per-element loss
(EDM sums it over pixels and batch and divides by the per-GPU batch).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class EDMLoss:
    """λ(σ)·‖D(y + σn; σ) − y‖² per element, ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²)/(σ·σ_d)².

    λ makes the effective weight of the network's raw output F uniform over σ (EDM Eq. 8, Table 1).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        if not p_std > 0 or not sigma_data > 0:
            raise ValueError(f"EDMLoss: p_std ({p_std}) and sigma_data ({sigma_data}) must be > 0")
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, net: Callable, images: torch.Tensor, generator: torch.Generator,
                 labels: Optional[torch.Tensor] = None, augment_labels: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """Per-element loss, shaped like `images`; `labels` one-hot [B, label_dim] or None."""
        shape = (images.shape[0], 1, 1, 1)
        rnd = torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        denoised = net(images + noise * sigma, sigma, labels, augment_labels=augment_labels)
        return weight * (denoised - images) ** 2


def ema_beta(batch_size: int, n_img_seen: float, halflife_kimg: float, rampup: Optional[float] = 0.05) -> float:
    """Per-step EMA decay 0.5^(batch / half-life); the half-life ramps up as min(half-life, rampup·images seen)
    so early averages do not remember the random init (EDM training_loop defaults: 500 kimg, ratio 0.05)."""
    halflife = halflife_kimg * 1000
    if rampup:
        halflife = min(halflife, rampup * n_img_seen)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def lr_warmup(base_lr: float, n_img: float, warmup_kimg: float) -> float:
    """Linear warm-up over `warmup_kimg` thousand images, then constant (EDM: 10 Mimg, no decay);
    warmup_kimg = 0 means no warm-up at all (the full rate from the first step)."""
    if warmup_kimg <= 0:
        return base_lr
    return base_lr * min(n_img / (warmup_kimg * 1000), 1.0)
