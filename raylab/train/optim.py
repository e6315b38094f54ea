"""SGD as the reference builds it, with normalization parameters exempt from weight decay.

reference/training_recipe.md §1: SGD, momentum 0.9, Nesterov, weight decay 5e-4 in two groups; the reference
exempts every parameter whose *name* contains "batchnorm" (so conv weights and the logits weight and bias are
decayed). Matching names breaks on any model that spells its norm layers differently, so here the exemption is by
module type: every parameter owned by a BatchNorm/SyncBatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm module.
Optional linear LR scaling (Goyal et al. 2017): lr * global_batch / lr_base_batch.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from raylab.config import TrainConfig
from raylab.knobs import ConfigError

# _NormBase covers BatchNorm{1,2,3}d, SyncBatchNorm and InstanceNorm*; the rest have no common base class.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _owned_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Parameter]]:
    """(owning module, parameter) once per trainable parameter, shared parameters counted once."""
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield module, p


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed group, normalization group with weight_decay 0]; empty groups are dropped."""
    decay, no_decay = [], []
    for module, p in _owned_parameters(model):
        (no_decay if isinstance(module, NORM_TYPES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """cfg.lr, linearly scaled by global_batch / cfg.lr_base_batch when that is > 0."""
    if global_batch < 1:
        raise ValueError(f"global_batch: {global_batch} must be >= 1")
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch > 0 else cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, global_batch: int) -> torch.optim.SGD:
    """SGD(momentum, nesterov) with two weight-decay groups; works on DDP-wrapped models too."""
    if cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError("train.nesterov: requires train.momentum > 0 (got 0)")
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=scaled_lr(cfg, global_batch), momentum=cfg.momentum,
                           nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def clip_gradients(model: nn.Module, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the global gradient norm to max_norm (0 = off); returns the norm before clipping, or None."""
    if max_norm < 0:
        raise ValueError(f"max_norm: {max_norm} must be >= 0 (0 = off)")
    if max_norm == 0:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if params else None
