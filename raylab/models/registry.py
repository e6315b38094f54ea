"""Classifier registry: `@register_model("name")` records a factory, `create_model` is the only public door.

Every model takes inputs in [0, 1] of shape (N, 3, 32, 32) and normalizes inside `forward` with `mean`/`std`
buffers, so attacks, AutoAttack and RobustBench all see the same [0, 1] threat model (training_recipe.md §1).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


class ModelError(ValueError):
    """A one-line message naming the bad model argument and what is allowed."""


ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}

# Reference `_ACTIVATION` (wideresnetwithswish.py): "swish" is nn.SiLU. The reference builds them inplace; raylab
# does not: under autograd an in-place SiLU clones its input for the backward (SiLU' needs the pre-activation), so
# inplace saves no memory and costs a copy per activation: 2-10% of a TRADES-10 step on CPU (bench_train_step.py),
# bitwise-identical numbers.
ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: record `factory(*, num_classes, mean, std, activation)` under `name`."""
    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ModelError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory
    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def _check_stats(what: str, values: Sequence[float], positive: bool) -> None:
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        rule = "3 finite positive floats" if positive else "3 finite floats"
        raise ModelError(f"model {what}: {tuple(values)} must be {rule} (one per RGB channel)")


def create_model(name: str, *, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 activation: str = "silu") -> nn.Module:
    """Build a registered classifier (fp32, train mode, on the current default device)."""
    if name not in _MODELS:
        raise ModelError(f"model.name: {name!r} is not one of {', '.join(list_models())}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"model.activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model num_classes: {num_classes!r} must be an int >= 1")
    _check_stats("mean", mean, positive=False)
    _check_stats("std", std, positive=True)
    return _MODELS[name](num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                         activation=ACTIVATIONS[activation])


# ---------------------------------------------------------------------------------------------------------------
# Shared building blocks of the model files.

def register_normalization(module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """`mean`/`std` buffers shaped (3, 1, 1): RobustBench `DMWideResNet`'s layout, so state_dicts load strictly."""
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def check_input(x: torch.Tensor) -> None:
    """The CIFAR-sized models pool a fixed 8x8 (or 4x4) map: any other input size would mis-shape silently."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ModelError(f"model input: shape {tuple(x.shape)} must be (N, 3, 32, 32) with values in [0, 1]")


def strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the reference's `DataParallel(Sequential(model))` prefixes (`module.0.`, `module.`, `0.`)."""
    for prefix in ("module.0.", "module.", "0."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_reference_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a DM-Improves-AT / RobustBench checkpoint strictly; `mean`/`std` may be absent (the reference keeps
    them as plain attributes, training_recipe.md §1), in which case the model's own buffers are kept."""
    own = model.state_dict()
    loaded = strip_wrappers(state_dict)
    for key in ("mean", "std"):
        loaded.setdefault(key, own[key])
    model.load_state_dict(loaded, strict=True)
