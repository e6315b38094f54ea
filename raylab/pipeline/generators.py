"""Generator registry of the generation job, keyed like `generate.generator`: how to find the default checkpoint,
load it (in each sampler actor), read its label count, sample a shard's images and describe the sampler; plus
`GenerateError`, the error of every generate-stage check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from raylab.config import ExperimentConfig, GenerateConfig
from raylab.data.datasets import load_splits
from raylab.generate.checkpoint import MODEL_FILE, load_generator
from raylab.generate.sampler import sample_kwargs
from raylab.generate.seeds import generate_images
from raylab.io import sha256_file
from raylab.pipeline.gaussian import FULL_RANK, fit_gaussian, load_gaussian, sample_gaussian, save_gaussian
from raylab.pipeline.plan import sampler_identity


class GenerateError(ValueError):
    """A one-line message naming the generate setting or file at fault and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Generators: registry keyed like `generate.generator`.

@dataclass(frozen=True)
class GeneratorKind:
    default: Callable[[ExperimentConfig, Path], Path]              # the checkpoint when generate.checkpoint == ''
    check_default: Callable[[ExperimentConfig], None]              # `default` would succeed (driver, no compute)
    load: Callable[[Path, GenerateConfig, torch.device], Any]      # in each sampler actor
    label_dim: Callable[[Any], int]                                # 0 = unconditional
    sample: Callable[[Any, list[int], np.ndarray, GenerateConfig, torch.device], np.ndarray]
    sampler_identity: Callable[[GenerateConfig], Optional[dict]]


GENERATORS: dict[str, GeneratorKind] = {}


def _default_edm(cfg: ExperimentConfig, out_dir: Path | None = None) -> Path:
    """The committed tiny digits EDM (raylab.generate.sample_local.default_generator_path); only for digits."""
    hint = "pass generate.checkpoint=PATH (a raylab EDM directory or an official .pkl)"
    if cfg.data.dataset != "digits":
        raise GenerateError(f"generate.checkpoint: '' means the committed digits EDM, but data.dataset="
                            f"{cfg.data.dataset}; {hint}")
    from raylab.generate.sample_local import default_generator_path

    path = Path(default_generator_path())
    if not (path / "model.pt").is_file():
        raise GenerateError(f"generate.checkpoint: '' means the committed digits EDM, not in this checkout "
                            f"({path}); {hint}")
    return path


def gaussian_fit_name(rank: int) -> str:
    """The fit file's name in the store, by `generate.gaussian_rank`: a store resumed with another rank must not
    reuse the old fit (the store's identity then changes with the file's sha256, and opening it fails loudly)."""
    return f"gaussian-fit-{'full' if rank == FULL_RANK else f'rank{rank}'}.npz"


def _default_gaussian(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Fit the class-conditional Gaussian (rank `generate.gaussian_rank`) on data.dataset's training split once;
    reuse the file afterwards."""
    path = out_dir / gaussian_fit_name(cfg.generate.gaussian_rank)
    if not path.exists():
        train = load_splits(cfg.data).train
        save_gaussian(fit_gaussian(train.images, train.labels, train.num_classes, cfg.generate.gaussian_rank), path)
    return path


def _sample_edm(net: Any, seeds: list[int], labels: np.ndarray, gen: GenerateConfig,
                device: torch.device) -> np.ndarray:
    cond = labels if net.label_dim else None
    return generate_images(net, seeds, cond, sample_kwargs(gen), device=device, latents_on_cpu=gen.latents_on_cpu,
                           batch_size=gen.batch_size)[0]


GENERATORS["edm"] = GeneratorKind(
    default=_default_edm, check_default=_default_edm,
    load=lambda path, gen, device: load_generator(path).to(device).eval(),
    label_dim=lambda net: int(net.label_dim), sample=_sample_edm, sampler_identity=sampler_identity)
GENERATORS["gaussian"] = GeneratorKind(
    # the fit comes from the training split, whose files check_dataset checks
    default=_default_gaussian, check_default=lambda cfg: None, load=lambda path, gen, device: load_gaussian(path),
    label_dim=lambda fit: fit.num_classes,
    sample=lambda fit, seeds, labels, gen, device: sample_gaussian(fit, seeds, labels),
    sampler_identity=lambda gen: None)


def checkpoint_sha256(path: Path) -> str:
    """Content hash of a generator checkpoint: model.pt of a raylab EDM directory, else the file itself."""
    return sha256_file(path / MODEL_FILE if path.is_dir() else path)
