"""One evaluation chunk, in any process: the fixed chunking, per-chunk random streams, the registry of measures
(clean, PGD-k, AutoAttack, certification) and the gradient-masking checks' settings (Rebuffi et al. 2021 App. C).

Pure torch plus pyautoattack: no Ray, no files beyond AutoAttack's per-chunk state. `raylab.eval.job` runs these
on Ray Data actors (or in this process) and persists what they return.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from raylab.config import EvalConfig
from raylab.eval.autoattack import Budget, run_autoattack
from raylab.eval.checks import CHECKS, DEFAULT_STEPS, CheckReport
from raylab.eval.metrics import EvalError, correct_flags, pgd_flags, require_eval_mode

STREAMS = {"pgd": 0, "certify": 1}
# Fig. 10(a) of Rebuffi et al. 2021: eps from 0 to 8x the evaluated radius (0 ... 64/255 at 8/255).
CHECK_EPS_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def plan_chunks(n: int, chunk_size: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each fixed chunk of the first n test images."""
    return tuple((start, min(start + chunk_size, n)) for start in range(0, n, chunk_size))


def chunk_seed(seed: int, chunk: int, stream: str) -> int:
    """Seed of one chunk's random stream: a function of (eval.seed, chunk id, stream) only."""
    return int(np.random.SeedSequence([seed, chunk, STREAMS[stream]]).generate_state(1)[0])


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> contiguous float NCHW in [0, 1] on the CPU (the model normalizes inside; pyautoattack
    `.view`s gradients, which fails on the strides a bare permute leaves). `np.array` copies: images from Ray's
    object store are read-only, which torch warns about."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# One chunk, in any process: a registry of measures, each (model, x, y, job) -> JSON-able value or None.

@dataclass(frozen=True)
class ChunkJob:
    chunk: int
    eval: EvalConfig
    num_classes: int
    state_path: Optional[Path] = None


Measure = Callable[[nn.Module, torch.Tensor, torch.Tensor, ChunkJob], Any]
MEASURES: dict[str, Measure] = {}


def register_measure(name: str) -> Callable[[Measure], Measure]:
    def decorate(fn: Measure) -> Measure:
        MEASURES[name] = fn
        return fn
    return decorate


def aa_attacks(ev: EvalConfig) -> Optional[tuple[str, ...]]:
    """The attack list of eval.aa_attacks for the custom version; None for the presets (they fix it)."""
    if ev.autoattack != "custom":
        return None
    return ev.custom_attacks


def aa_budget(ev: EvalConfig) -> Budget:
    return Budget(ev.aa_iters, ev.aa_restarts, ev.aa_target_classes) if ev.autoattack == "custom" else Budget()


@register_measure("clean")
def _clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, job: ChunkJob) -> list[int]:
    return correct_flags(model, x, y, batch_size=job.eval.batch_size).int().tolist()


@register_measure("pgd")
def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, job: ChunkJob) -> list[int]:
    """The papers' PGD-k: margin loss, one uniform random start, step eps/4 (metrics.pgd_flags)."""
    ev = job.eval
    generator = torch.Generator().manual_seed(chunk_seed(ev.seed, job.chunk, "pgd"))  # CPU: same on any device
    return pgd_flags(model, x, y, norm=ev.norm, eps=ev.eps, steps=ev.pgd_steps, objective="margin",
                     batch_size=ev.batch_size, generator=generator).int().tolist()


@register_measure("aa")
def _autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, job: ChunkJob) -> Optional[dict]:
    ev = job.eval
    if ev.autoattack == "none":
        return None
    return run_autoattack(model, x, y, norm=ev.norm, eps=ev.eps, version=ev.autoattack, attacks=aa_attacks(ev),
                          seed=ev.seed, batch_size=ev.batch_size, state_path=job.state_path,
                          budget=aa_budget(ev)).to_json()


@register_measure("certify")
def _certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, job: ChunkJob) -> Optional[dict]:
    ev = job.eval
    if not ev.certify:
        return None
    from raylab.eval.certify import certify  # scipy.stats: a third of an actor's import time, only when asked

    generator = torch.Generator().manual_seed(chunk_seed(ev.seed, job.chunk, "certify"))
    preds, radii = certify(model, x, sigma=ev.certify_sigma, n0=ev.certify_n0, n=ev.certify_n,
                           alpha=ev.certify_alpha, batch_size=ev.batch_size, generator=generator,
                           num_classes=job.num_classes)
    return {"preds": preds.tolist(), "radii": radii.tolist()}


def evaluate_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, job: ChunkJob) -> dict[str, Any]:
    """Every measure on one chunk. A model in train mode is refused before any compute."""
    require_eval_mode(model)
    return {name: measure(model, x, y, job) for name, measure in MEASURES.items()}


# ---------------------------------------------------------------------------------------------------------------
# Gradient-masking checks (Rebuffi et al. 2021 App. C) on the first chunk, settings derived from the eval config.

def _check_steps(pgd_steps: int) -> tuple[int, ...]:
    """Fig. 10(b)'s step counts up to the evaluated PGD-k (the paper goes on to 1000)."""
    return tuple(sorted({s for s in DEFAULT_STEPS if s <= pgd_steps} | {pgd_steps}))


CHECK_SETTINGS: dict[str, Callable[[EvalConfig], dict[str, Any]]] = {
    "accuracy_vs_eps": lambda ev: {"eps_list": tuple(m * ev.eps for m in CHECK_EPS_MULTIPLES), "norm": ev.norm,
                                   "steps": ev.pgd_steps, "seed": ev.seed, "batch_size": ev.batch_size},
    "accuracy_vs_steps": lambda ev: {"steps_list": _check_steps(ev.pgd_steps), "norm": ev.norm, "eps": ev.eps,
                                     "seed": ev.seed, "batch_size": ev.batch_size},
}


def resolve_checks(checks: bool | Sequence[str], ev: EvalConfig) -> tuple[str, ...]:
    """True = every check; names are validated before any compute."""
    names = tuple(CHECK_SETTINGS) if checks is True else tuple(checks or ())
    unknown = [c for c in names if c not in CHECK_SETTINGS or c not in CHECKS]
    if unknown:
        raise EvalError(f"checks: {unknown} are not among {', '.join(CHECK_SETTINGS)}")
    if names and ev.eps <= 0:
        raise EvalError("checks: the gradient-masking checks sweep multiples of eval.eps, which must be > 0")
    return names


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str],
               ev: EvalConfig) -> list[CheckReport]:
    return [CHECKS[name](model, x, y, **CHECK_SETTINGS[name](ev)) for name in names]
