"""The precision policy: which arithmetic each stage runs in, and its record as MLflow params. Pure torch.

- Training forward/backward: bf16 autocast when `train.bf16` (weights, gradients, optimizer and EMA stay fp32),
  else fp32 (TF32 tensor cores on a GPU with `train.tf32`, raylab.runtime.gpu_backends).
- The training attack: its perturbation arithmetic (random start, step, projection, [0, 1] clamp) is always fp32:
  x_adv is an fp32 tensor and autocast only rounds the copy that enters the first convolution. `attack.precision`
  picks its forward/backward passes: "train" (as the training forward; with bf16 that first rounding is ~0.5-1/255
  at normalized magnitudes, a quarter to a half of the 2/255 step) or "fp32" (outside autocast).
  bench/bench_precision.py measures what that rounding does to an attack.
- Evaluation (clean, PGD-k, AutoAttack, certification): fp32 (TF32 with `eval.tf32`); bf16 only with `eval.bf16`.
  Validation inside training runs without autocast (fp32, or TF32 with `train.tf32`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from raylab.config import ExperimentConfig


def autocast(device_type: str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device_type` when `bf16`, else nothing (the caller's precision)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# attack.precision -> the context its forward/backward passes run in (inside the training step's autocast).
ATTACK_PRECISION: dict[str, Callable[[str], contextlib.AbstractContextManager]] = {
    "train": lambda device_type: contextlib.nullcontext(),
    "fp32": lambda device_type: torch.autocast(device_type, enabled=False),
}


class BF16Logits(nn.Module):
    """`module` under bf16 autocast, returning fp32 logits: what eval.bf16 hands to every eval attack (AutoAttack's
    losses and argmaxes then see fp32, as they would from an fp32 model)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.module(x).float()


def label(bf16: bool, tf32: bool, gpu: bool) -> str:
    """'bf16' (autocast), 'tf32' (fp32 tensors, TF32 tensor cores) or 'fp32'."""
    return "bf16" if bf16 else "tf32" if tf32 and gpu else "fp32"


def precision_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The derived MLflow params `precision.train`, `precision.attack`, `precision.eval`: what actually ran, which
    the raw knobs say only together (TF32 needs a GPU, attack.precision=train follows train.bf16)."""
    gpu, train = cfg.resources.use_gpu, cfg.train
    attack_bf16 = train.bf16 and cfg.attack.precision == "train"
    return {"precision.train": label(train.bf16, train.tf32, gpu),
            "precision.attack": label(attack_bf16, train.tf32, gpu),
            "precision.eval": label(cfg.eval.bf16, cfg.eval.tf32, cfg.resources.gpus_per_actor > 0)}
