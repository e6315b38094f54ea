"""raylab's own EDM checkpoints, and `load_generator`, which opens either ours or an official snapshot.

A checkpoint is a directory:
- `model.pt`: the network's state_dict (`torch.save`; loaded back with `weights_only=True`, so no code runs);
- `network.json`: {"format", "class", "kwargs" (constructor kwargs, official names), "extra", "model_sha256"}.
`model.pt` is written first and `network.json` last, each atomically, so a directory with a `network.json` is
complete; the hash in it catches a `model.pt` replaced or truncated later.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from raylab.generate.networks import make_network
from raylab.generate.official import load_official_pickle
from raylab.io import atomic_write_bytes, atomic_write_json, sha256_file

FORMAT = "raylab-edm/1"
MODEL_FILE, META_FILE = "model.pt", "network.json"


class CheckpointError(ValueError):
    """A one-line message naming the checkpoint path and what is wrong with it."""


def save_edm(path_dir: str | os.PathLike, net: nn.Module, net_kwargs: Optional[dict[str, Any]] = None,
             extra: Optional[dict[str, Any]] = None) -> Path:
    """Write `net` (a preconditioned EDM network) to `path_dir`; kwargs default to `net.init_kwargs`."""
    path_dir = Path(path_dir)
    kwargs = dict(net.init_kwargs if net_kwargs is None else net_kwargs)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    atomic_write_bytes(path_dir / MODEL_FILE, buf.getvalue())
    meta = {"format": FORMAT, "class": type(net).__name__, "kwargs": kwargs, "extra": extra or {},
            "model_sha256": sha256_file(path_dir / MODEL_FILE)}
    atomic_write_json(path_dir / META_FILE, meta)
    return path_dir


def read_meta(path_dir: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(path_dir) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path_dir}: no {META_FILE} (not a raylab EDM checkpoint, or incomplete)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_edm(path_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The network saved by `save_edm`, weights loaded strictly, in eval mode."""
    meta = read_meta(path_dir)
    model_path = Path(path_dir) / MODEL_FILE
    if not model_path.is_file() or sha256_file(model_path) != meta["model_sha256"]:
        raise CheckpointError(f"{model_path}: missing or does not match model_sha256 in {META_FILE}")
    net = make_network(meta["class"], meta["kwargs"])
    net.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True), strict=True)
    return net.to(map_location).eval()


# ---------------------------------------------------------------------------------------------------------------
# Format registry: `load_generator(path)` asks each format whether it recognises the path.

_FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], nn.Module]]] = {}


def register_format(name: str, matches: Callable[[Path], bool]):
    """Decorator: `loader(path) -> net` is used for paths where `matches(path)` is true."""
    def decorate(loader: Callable[[Path], nn.Module]) -> Callable[[Path], nn.Module]:
        _FORMATS[name] = (matches, loader)
        return loader
    return decorate


@register_format("raylab", matches=lambda p: p.is_dir() and (p / META_FILE).is_file())
def _load_raylab(path: Path) -> nn.Module:
    return load_edm(path)


@register_format("official", matches=lambda p: p.is_file() and p.suffix == ".pkl")
def _load_official(path: Path) -> nn.Module:
    return load_official_pickle(path)[0]


def load_generator(path: str | os.PathLike) -> nn.Module:
    """A generator network from a raylab checkpoint directory or an official NVlabs `.pkl` snapshot."""
    path = Path(path)
    for matches, loader in _FORMATS.values():
        if matches(path):
            return loader(path)
    raise CheckpointError(f"{path}: not a generator checkpoint (expected a directory with {META_FILE} or an "
                          f"official .pkl; formats: {', '.join(_FORMATS)})")
