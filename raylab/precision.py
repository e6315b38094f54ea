"""The precision policy: which arithmetic each stage runs in, and its record as MLflow params. Pure torch.

- Training forward/backward: bf16 autocast when `train.bf16` (weights, gradients, optimizer and EMA stay fp32),
  else fp32 (TF32 tensor cores on a GPU with `train.tf32`, raylab.runtime.gpu_backends).
- The training attack: its perturbation arithmetic (random start, step, projection, [0, 1] clamp) is always fp32:
  x_adv is an fp32 tensor and autocast only rounds the copy that enters the first convolution. `attack.precision`
  picks its forward/backward passes: "train" (the default: as the training forward) or "fp32" (outside autocast).
  Why "train": the attack is 77% of a TRADES-10 step's FLOPs (WRN-28-10: 210 of 273 GFLOP per image, counted by
  FlopCounterMode), so an fp32 attack gives back most of bf16's speed-up; and bf16's rounding of the input (up to
  0.5-1/255 on CIFAR-10 at normalized magnitudes, a quarter to a half of the 2/255 step; 0.3/255 median on digits)
  did not weaken attacks: on fp32-trained tiny digits models (three checkpoints, eps 16/255 and 8/255), PGD-10 and
  APGD-CE+T in bf16 left at most 1 of 300 images robust that fp32 broke (and broke up to 3 that fp32 did not), and
  PGD's bf16 examples fooled the fp32 model exactly as often (bench/bench_precision.py; rerun it on a CIFAR-10
  checkpoint before a paper-scale claim).
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
