"""Load the official NVlabs EDM snapshots (`edm-*.pkl`) without running any code they contain.

The snapshots are plain pickles of `@persistent_class` objects whose reduction embeds the full source of the
defining module (`module_src`); `pickle.load` would exec it (edm.md §3). Here an allowlist unpickler maps exactly
the globals such a file needs to inert handlers and refuses everything else with `UnsafePickleError` naming the
global as "module.name". Persistent objects become `PersistentNode(class_name, state)`; the tree under the chosen
top-level key ("ema") is walked into a flat state dict and loaded with strict=True into *our* network, rebuilt from
the stored `_init_kwargs` (`raylab.generate.networks`). The weights keep their licence (CC BY-NC-SA 4.0).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from raylab.generate.networks import make_network


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (the message names it as "module.name")."""


class OfficialFormatError(ValueError):
    """The pickle is safe but not an EDM snapshot layout we understand (one line: what and where)."""


# ---------------------------------------------------------------------------------------------------------------
# Inert stand-ins for the allowed globals.

class PersistentNode:
    """A `@persistent_class` instance: its class name and its `__dict__`; `module_src` is dropped unread."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self) -> str:
        return f"PersistentNode({self.class_name})"


class ContainerNode:
    """A plain torch container (ModuleDict): the pickle creates it empty (NEWOBJ) and BUILDs its `__dict__`."""

    class_name = "ModuleDict"

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: dict = {}

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise OfficialFormatError(f"ModuleDict state: expected a dict, got {type(state).__name__}")
        self.state = state


def _reconstruct_persistent_obj(meta: Any) -> PersistentNode:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise OfficialFormatError("persistent object: meta must be a dict with type 'class' and a class_name")
    if not isinstance(meta.get("state"), dict):
        raise OfficialFormatError(f"persistent object {meta['class_name']}: state must be a dict")
    return PersistentNode(meta["class_name"], meta["state"])


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, state: Any = None):
    """Parameters become their data tensor (requires_grad, hooks and extra state are irrelevant for loading)."""
    if not isinstance(data, torch.Tensor):
        raise OfficialFormatError(f"parameter: expected a tensor, got {type(data).__name__}")
    return data


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise OfficialFormatError(f"tensor: expected a storage, got {type(storage).__name__}")
    typed = isinstance(storage, torch.TypedStorage)
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what legacy payloads decode to
        warnings.simplefilter("ignore", UserWarning)
        untyped, dtype = (storage.untyped(), storage.dtype) if typed else (storage, torch.uint8)
    return torch.empty(0, dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))


def _load_storage(data: Any) -> Any:
    """A storage payload is a legacy `torch.save` of one storage; torch's own weights-only loader decodes it."""
    if not isinstance(data, (bytes, bytearray)):
        raise OfficialFormatError(f"storage payload: expected bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _numpy_scalar(dtype: np.dtype, data: bytes = b"") -> np.generic:
    """numpy scalars (e.g. UNetBlock.skip_scale, a float64): numeric dtypes only, decoded from their raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.hasobject:
        raise OfficialFormatError(f"numpy scalar: dtype {dtype!r} is not a plain numeric dtype")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): ContainerNode,
    # Files written under numpy < 2 (all the 2022 snapshots) name the module numpy.core; numpy 2 writes numpy._core.
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
}


class AllowlistUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; any other global raises before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        handler = ALLOWED_GLOBALS.get((module, name))
        if handler is None:
            raise UnsafePickleError(f"refusing global '{module}.{name}': not on the EDM snapshot allowlist "
                                    "(raylab.generate.official.ALLOWED_GLOBALS)")
        return handler

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}: EDM snapshots contain none")


# ---------------------------------------------------------------------------------------------------------------
# Node tree → state dict → our network.

def flatten_state(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module node and its children, with dotted names."""
    state = getattr(node, "state", None)
    if not isinstance(state, dict):
        raise OfficialFormatError(f"module {prefix or '<root>'}: expected a module node, got {type(node).__name__}")
    skip = set(state.get("_non_persistent_buffers_set", ()))
    tensors = {**state.get("_parameters", {}),
               **{k: v for k, v in state.get("_buffers", {}).items() if k not in skip}}
    out = {prefix + name: t for name, t in tensors.items() if t is not None}
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(flatten_state(child, f"{prefix}{name}."))
    return out


def read_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level dict of an EDM snapshot (`ema`, `loss_fn`, `augment_pipe`, `dataset_kwargs`), as nodes."""
    with open(path, "rb") as f:
        try:
            data = AllowlistUnpickler(f).load()
        except UnsafePickleError as err:  # name the file: the refusal reaches the user as one line
            raise UnsafePickleError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise OfficialFormatError(f"{path}: top level is a {type(data).__name__}, expected a dict of snapshots")
    return data


def load_official_pickle(path: str | os.PathLike, key: str = "ema") -> tuple[nn.Module, dict[str, Any]]:
    """(our network with the snapshot's weights, eval mode, no grads; the stored constructor kwargs)."""
    data = read_snapshot(path)
    node = data.get(key)
    if not isinstance(node, PersistentNode):
        raise OfficialFormatError(f"{path}: key {key!r} is not a persistent network (keys: {', '.join(data)})")
    kwargs = node.state.get("_init_kwargs")
    if not isinstance(kwargs, dict):
        raise OfficialFormatError(f"{path}: {node.class_name} has no _init_kwargs dict to rebuild from")
    net = make_network(node.class_name, dict(kwargs))
    try:
        net.load_state_dict(flatten_state(node), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise OfficialFormatError(f"{path}: weights do not match {node.class_name}: {' | '.join(first)}") from None
    return net.eval().requires_grad_(False), dict(kwargs)
