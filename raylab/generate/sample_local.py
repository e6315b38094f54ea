"""Local, single-process sampling from a generator checkpoint into files (a PNG grid and/or an .npz), no Ray.

For looking at a model and for small sets; large sets go through the Ray Data pipeline. Both use the same seed
plan (`raylab.generate.seeds.image_seed`: image i of class c is seeded by (seed, c, i)), so for the same dataset
seed, checkpoint and sampler settings an image here has the same bytes as there, on the same device.

Images are laid out class-major: `num` images are spread evenly over the requested classes (the first
`num % len(classes)` classes get one more), so a grid with `ceil(num / len(classes))` images per row shows one
class per row. `default_generator_path()` is the committed tiny digits EDM (used when generate.checkpoint is "").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from raylab.generate.checkpoint import load_generator
from raylab.generate.sampler import SOLVERS
from raylab.generate.seeds import generate_images, image_seeds
from raylab.images import tile
from raylab.io import atomic_write

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "edm-digits"
GRID_FILE, NPZ_FILE = "samples.png", "samples.npz"


class SampleError(ValueError):
    """A one-line message naming the bad sampling argument and what is allowed."""


def default_generator_path() -> Path:
    """The committed tiny class-conditional EDM trained on the embedded digits (`scripts/train_tiny_edm.sh`)."""
    return ASSET_DIR


def resolve_generator_path(checkpoint: str | os.PathLike) -> Path:
    """`generate.checkpoint` → a path: "" means the committed digits EDM."""
    return default_generator_path() if str(checkpoint) == "" else Path(checkpoint)


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SampleError(f"{what}: {value!r} must be an int >= 1")
    return int(value)


def _chosen_classes(label_dim: int, classes: Optional[Sequence[int]]) -> list[int]:
    """The classes to draw: all of them by default; −1 is the one "class" of an unconditional network."""
    allowed = list(range(label_dim)) or [-1]
    if classes is None:
        return allowed
    chosen = [int(c) for c in classes]
    bad = [c for c in chosen if c not in allowed]
    if not chosen or bad:
        what = f"0..{label_dim - 1}" if label_dim else "-1 (unconditional network)"
        raise SampleError(f"class_labels: {bad or 'empty'} not allowed; this network takes {what}")
    return chosen


def class_plan(num: int, label_dim: int, classes: Optional[Sequence[int]] = None, seed: int = 0
               ) -> tuple[list[int], np.ndarray]:
    """(seeds, labels) of `num` images, class-major, spread evenly over `classes` (None = all classes)."""
    chosen = _chosen_classes(label_dim, classes)
    _positive("num", num)
    counts = [num // len(chosen) + (i < num % len(chosen)) for i in range(len(chosen))]
    seeds, labels = [], []
    for cls, count in zip(chosen, counts):
        seeds += image_seeds(seed, cls, range(count))
        labels += [cls] * count
    return seeds, np.asarray(labels, np.int64)


def sample_images(net: nn.Module, num: int, kwargs: Mapping[str, Any], seed: int = 0,
                  class_labels: Optional[Sequence[int]] = None, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [num, H, W, C], int64 labels [num]) from `net` with `edm_sample` keyword arguments `kwargs`."""
    seeds, labels = class_plan(num, net.label_dim, class_labels, seed)
    _positive("batch_size", batch_size)
    return generate_images(net, seeds, labels, kwargs, device=device, batch_size=batch_size)


def write_grid_png(path: str | os.PathLike, images: np.ndarray, per_row: int) -> Path:
    """A PNG mosaic of uint8 NHWC `images` (gray when all channels agree), written atomically."""
    from PIL import Image  # Pillow ships with matplotlib

    mosaic = tile(images, _positive("per_row", per_row), error=SampleError)
    gray = mosaic.shape[-1] == 1 or bool((mosaic == mosaic[..., :1]).all())
    picture = Image.fromarray(mosaic[..., 0] if gray else mosaic)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


@dataclass(frozen=True)
class SampleFiles:
    images: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    grid: Optional[Path]
    npz: Optional[Path]


def sample_to_dir(generator_path: str | os.PathLike, num: int, steps: int, out_dir: str | os.PathLike,
                  seed: int = 0, class_labels: Optional[Sequence[int]] = None, *, solver: str = "heun",
                  grid: bool = True, npz: bool = True, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> SampleFiles:
    """Sample `num` images with `steps` EDM steps from a checkpoint ("" = the committed digits EDM) and write
    `<out_dir>/samples.png` (one class per row) and/or `<out_dir>/samples.npz` (image uint8 NHWC, label, seed)."""
    _positive("num", num)
    _positive("steps", steps)
    if solver not in SOLVERS:
        raise SampleError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    if not (grid or npz):
        raise SampleError("sample_to_dir: nothing to write (grid and npz are both off)")
    net = load_generator(resolve_generator_path(generator_path)).to(device)
    seeds, _ = class_plan(num, net.label_dim, class_labels, seed)  # validates the classes before sampling
    images, labels = sample_images(net, num, {"num_steps": steps, "solver": solver}, seed, class_labels,
                                   batch_size, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_row = -(-num // len(set(labels.tolist())))
    grid_path = write_grid_png(out / GRID_FILE, images, per_row) if grid else None
    npz_path = None
    if npz:
        arrays = {"image": images, "label": labels, "seed": np.asarray(seeds, np.int64)}
        npz_path = atomic_write(out / NPZ_FILE, lambda tmp: _save_npz(tmp, arrays))
    return SampleFiles(images, labels, np.asarray(seeds, np.int64), grid_path, npz_path)


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a temp name
        np.savez(fh, **arrays)
