"""What a classifier says about generated images: per-image scores, and the Fréchet distance between two sets.

Scores (Wang et al. 2023 App. A, after Carmon et al. 2019): a standard (non-robust) classifier, the *scorer*,
gives every generated image `score` = softmax probability of its label, `pred` = argmax class and `confidence` = max
probability; unconditional images take `pred` as their pseudo-label. Per-class top-k selection reads `score`.

Fréchet distance (Heusel et al. 2017): fit a Gaussian to each set's features and compute

    FD = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}).

Two feature extractors, labelled so they cannot be confused:
- "FD (scorer features)": the scorer's penultimate activations (the input of its last linear layer, taken with a
  forward hook). Cheap and always available, but NOT FID: the numbers are not comparable with published FIDs.
- "FID (Inception)": only from a TorchScript Inception detector file the user supplies (generate.inception_weights;
  nothing downloads), loaded with `torch.jit.load` (no pickle): a module called as
  `net(uint8 NCHW, return_features=True)` → (N, 2048) pool features, the interface of the StyleGAN/EDM detector.
  Published FIDs use 50K generated images against the full training set.
The generation job (raylab.pipeline.generate_job.QUALITY_METRICS) compares generated with real *test* images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from raylab.config import from_json
from raylab.data.datasets import get_dataset
from raylab.io import sha256_file
from raylab.models import create_model

SCORER_FILE = "best.pt"
FD_LABEL = "FD (scorer features)"
FID_LABEL = "FID (Inception)"


class QualityError(ValueError):
    """A one-line message naming the scorer / feature file or input at fault and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# The scorer: a raylab classifier checkpoint (`best.pt` = {"model": state_dict, "epoch", "metrics"}) and the
# `config.json` beside it that states its architecture.

def scorer_file(path: str | os.PathLike) -> Path:
    """`best.pt` itself, or the `best.pt` inside a run directory."""
    path = Path(path)
    found = path / SCORER_FILE if path.is_dir() else path
    if not found.is_file():
        raise QualityError(f"scorer checkpoint {path}: no such file (expected {SCORER_FILE} or a run directory "
                           "holding one)")
    return found


# What a scorer's config.json must state: the architecture (depth and width are in the model name) and the dataset.
STATED = ("model.name", "model.activation", "data.dataset")
_STATE_IT = ('put a config.json beside it that states them, e.g. {"model": {"name": "wrn-28-10", "activation": '
             '"relu"}, "data": {"dataset": "cifar10"}} (raylab\'s training runs write one)')


def scorer_identity(path: str | os.PathLike) -> dict[str, Any]:
    """{sha256, model, activation, dataset, file} of a scorer checkpoint whose weights load into the architecture
    the `config.json` beside it states (`stated_architecture`), checked here, in the driver, before any compute."""
    file = scorer_file(path)
    identity = {"sha256": sha256_file(file), **stated_architecture(file), "file": str(file.resolve())}
    _build(identity)
    return identity


def stated_architecture(file: Path) -> dict[str, str]:
    """{model, activation, dataset} as the `config.json` beside a scorer checkpoint states them (STATED), or a
    one-line refusal. Never guessed from the job's own config: a ReLU WRN-28-10 (the paper's scorer) loads strictly
    into raylab's SiLU one, whose weights have the same names and shapes, and scores wrongly without an error."""
    run_cfg = file.parent / "config.json"
    try:
        nested = json.loads(run_cfg.read_text())
    except FileNotFoundError:
        raise QualityError(f"scorer checkpoint {file}: its architecture is not stated ({run_cfg} is missing); "
                           f"{_STATE_IT}") from None
    except ValueError:
        raise QualityError(f"scorer checkpoint {file}: {run_cfg} is not JSON; {_STATE_IT}") from None
    missing = [key for key in STATED if not _states(nested, key)]
    if missing:
        raise QualityError(f"scorer checkpoint {file}: {run_cfg} does not state {', '.join(missing)}; {_STATE_IT}")
    trained = from_json(run_cfg.read_text())  # checks the values (a ConfigError names the key)
    return {"model": trained.model.name, "activation": trained.model.activation, "dataset": trained.data.dataset}


def _states(nested: Any, key: str) -> bool:
    section, name = key.split(".")
    return isinstance(nested, dict) and isinstance(nested.get(section), dict) and name in nested[section]


def _build(identity: Mapping[str, Any]) -> nn.Module:
    """The scorer's network with its weights, on CPU; weights of another architecture are one line."""
    spec = get_dataset(identity["dataset"])
    model = create_model(identity["model"], num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                         activation=identity["activation"])
    file = Path(identity["file"])
    payload = torch.load(file, map_location="cpu", weights_only=True)
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise QualityError(f"scorer checkpoint {file}: expected {{'model': state_dict, ...}}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split("\n\t")[1:2]) or str(err).splitlines()[0]
        raise QualityError(f"scorer checkpoint {file}: its weights are not a {identity['model']} of "
                           f"{identity['dataset']} as its config.json states ({first.strip()[:160]})") from None
    return model


def _head(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer (`logits` in the WideResNets, `linear` in ResNet-18)."""
    for name in ("logits", "linear", "fc"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return getattr(model, name)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QualityError(f"scorer {type(model).__name__}: no linear head to take penultimate features from")
    return linears[-1]


def _to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1]. Copied: shard images are read-only zero-copy views."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise QualityError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2).float().div(255.0)


@dataclass
class Scorer:
    """A loaded scorer in eval mode; outputs are computed in fixed `batch`-sized chunks, so a given input array
    always meets the same kernels (the bytes of a scored shard do not depend on the pipeline's batch size)."""
    model: nn.Module
    identity: dict[str, Any]
    num_classes: int
    device: torch.device

    @classmethod
    def load(cls, identity: Mapping[str, Any], device: str | torch.device = "cpu") -> "Scorer":
        file = Path(identity["file"])
        if sha256_file(file) != identity["sha256"]:
            raise QualityError(f"scorer checkpoint {file}: changed since the job was planned (sha256 differs)")
        device = torch.device(device)
        model = _build(identity)
        return cls(model.to(device).eval(), dict(identity), get_dataset(identity["dataset"]).num_classes, device)

    @torch.no_grad()
    def _map(self, images: np.ndarray, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        outs = [fn(_to_input(images[i:i + batch], self.device)).float().cpu().numpy()
                for i in range(0, len(images), batch)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def probs(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """Softmax probabilities (N, num_classes) float32 of uint8 NHWC images."""
        return self._map(images, batch, lambda x: self.model(x).softmax(dim=1))

    def features(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """Penultimate activations (N, F): the input of the last linear layer, captured by a forward hook."""
        captured: list[torch.Tensor] = []
        hook = _head(self.model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
        try:
            def run(x: torch.Tensor) -> torch.Tensor:
                captured.clear()
                self.model(x)
                return captured[0]
            return self._map(images, batch, run)
        finally:
            hook.remove()


def score_columns(probs: np.ndarray, class_cond: np.ndarray) -> dict[str, np.ndarray]:
    """Shard columns from probabilities: `label` (= class_cond, or the pseudo-label `pred` where class_cond is −1),
    `score` = p(label), `pred` = argmax, `confidence` = max p."""
    class_cond = np.asarray(class_cond, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(class_cond):
        raise QualityError(f"score_columns: probabilities {probs.shape} for {len(class_cond)} images")
    if class_cond.size and class_cond.max() >= probs.shape[1]:
        raise QualityError(f"class_cond: class {class_cond.max()} but the scorer has {probs.shape[1]} classes")
    pred = probs.argmax(axis=1)
    label = np.where(class_cond >= 0, class_cond, pred)
    return {"label": label.astype(np.int16), "score": probs[np.arange(len(label)), label].astype(np.float32),
            "pred": pred.astype(np.int16), "confidence": probs.max(axis=1).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance.

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with ddof=1) of (N, F) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise QualityError(f"features: need a (N >= 2, F) array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """Tr (Σ₁ Σ₂)^{1/2}, computed as Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} (a similar matrix, so the same eigenvalues).

    The symmetric form has real, non-negative eigenvalues, so `eigvalsh` is exact up to rounding even when the
    covariances are singular (more feature dimensions than images), where `scipy.linalg.sqrtm(Σ₁ Σ₂)` returns
    complex parts and needs the ε·I offset pytorch-fid adds. The tests check both agree on full-rank inputs.
    """
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2); never negative."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise QualityError(f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(float(fd), 0.0)


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def scorer_fd(scorer: Scorer, images1: np.ndarray, images2: np.ndarray, batch: int = 256) -> float:
    """"FD (scorer features)" between two uint8 image sets. Not FID (see the module docstring)."""
    return frechet_distance_features(scorer.features(images1, batch), scorer.features(images2, batch))


# ---------------------------------------------------------------------------------------------------------------
# Inception FID from a user-supplied detector.

class InceptionFeatures:
    """Pool features of a TorchScript Inception detector the user supplies (never downloaded)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path = path = Path(path)
        if not path.is_file():
            raise QualityError(f"Inception weights {path}: no such file (FID needs a TorchScript detector you "
                               "supply; raylab downloads nothing)")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise QualityError(f"Inception weights {path}: not a TorchScript module "
                               f"({str(err).splitlines()[0][:120]})") from None
        self.device = torch.device(device)

    def check(self) -> int:
        """The feature width, from two black 32×32 images: a detector with another interface fails here, before
        a job samples anything."""
        try:
            feats = self(np.zeros((2, 32, 32, 3), np.uint8))
        except (RuntimeError, TypeError) as err:
            raise QualityError(f"Inception weights {self.path}: not callable as net(uint8 NCHW, "
                               f"return_features=True) ({str(err).splitlines()[0][:120]})") from None
        if feats.ndim != 2 or len(feats) != 2:
            raise QualityError(f"Inception weights {self.path}: features of shape {feats.shape} for 2 images, "
                               "expected (2, F)")
        return int(feats.shape[1])

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch: int = 250) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise QualityError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        outs = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.array(images[i:i + batch])).permute(0, 3, 1, 2).to(self.device)
            outs.append(self.net(x, return_features=True).double().cpu().numpy())
        return np.concatenate(outs)


def inception_fid(weights: str | os.PathLike, images1: np.ndarray, images2: np.ndarray,
                  device: str | torch.device = "cpu", detector: Optional[InceptionFeatures] = None) -> float:
    """"FID (Inception)" between two uint8 image sets with the detector file `weights`."""
    detector = detector or InceptionFeatures(weights, device)
    return frechet_distance_features(detector(images1), detector(images2))
