"""Classifiers: WideResNets (DeepMind style, RobustBench-compatible names) and a CIFAR ResNet-18.

Build one with `create_model(name, num_classes=..., mean=..., std=..., activation="silu")`; names are
`list_models()` (== raylab.config.MODELS). Inputs are (N, 3, 32, 32) in [0, 1]; normalization is inside.
"""
from raylab.models import resnet, wideresnet  # noqa: F401  (registers the architectures)
from raylab.models.registry import (ACTIVATIONS, ModelError, create_model, list_models, load_reference_state_dict,
                                    register_model, strip_wrappers)

__all__ = ["ACTIVATIONS", "ModelError", "create_model", "list_models", "load_reference_state_dict",
           "register_model", "strip_wrappers"]
