"""AutoAttack (Croce & Hein 2020, the `pyautoattack` distribution) with its per-attack cascade and exact sharding.

`pyautoattack` computes the cascade of Rebuffi et al. 2021 Table 6 (robust accuracy after APGD-CE, +APGD-T, +FAB-T,
+Square) but only logs it, rounded to 0.01 %. raylab therefore drives the cascade one attack at a time through
the library's own `run_standard_evaluation`, each call on the points still robust. That is the library's own
loop unrolled: it attacks the robust points, in order, in batches of `batch_size`, each attack re-seeded with
`seed`, so the result equals one call with all attacks (tested). What we gain:

* `AAResult.fell_at`, the stage at which each example fell, from which clean accuracy, robust accuracy, the
  per-example robust flags and the cascade all follow exactly, so shards aggregate exactly (`aggregate`);
* a resumable state written atomically after every attack. The library's own `state_path` cannot resume in
  0.2.0: `EvaluationState.from_disk` restores the attack set as a list and the set comparison then always fails
  ("different set of attacks"), and a restored run would reach an unset `y_adv`.

The library's sanity-check warnings (randomized or dynamic model, softmax outputs, zero gradients, too few
classes, Square beating the white-box attacks) are captured from its `auto-attack` logger into
`AAResult.warnings`. The library seeds the global torch RNG inside every attack; `fork_rng` confines that.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from pyautoattack import AutoAttack, checks as aa_checks
from pyautoattack.autopgd_base import APGDAttack
from torch import nn

from raylab.eval.metrics import (EvalError, batch_slices, check_batch_size, check_eps, check_images,
                                 correct_flags, model_device, require_eval_mode)
from raylab.io import atomic_write_json

# raylab's norm names (config `eval.norm`) -> pyautoattack's.
AA_NORMS: dict[str, str] = {"linf": "Linf", "l2": "L2"}

# The library's presets (`AutoAttack._set_version`); "custom" takes the attack list from the caller.
VERSIONS: dict[str, tuple[str, ...] | None] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "custom": None,
}
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")



@dataclass(frozen=True)
class Budget:
    """The custom version's effort (the presets fix their own). Defaults are the library's custom-version settings:
    100 APGD iterations, 5 restarts of APGD-CE/DLR, 9 target classes of APGD-T (the standard version runs APGD-CE
    with 1 restart). A smaller budget is a cheaper, weaker AutoAttack: the tables name it (`label`)."""
    iters: int = 100
    restarts: int = 5
    target_classes: int = 9

    def label(self) -> str:
        """'' at the library's defaults, else e.g. '25 it, 1 restart, 3 targets'."""
        if self == Budget():
            return ""
        return (f"{self.iters} it, {self.restarts} restart{'s' * (self.restarts != 1)}, "
                f"{self.target_classes} target{'s' * (self.target_classes != 1)}")

    def apply(self, aa: AutoAttack) -> None:
        aa.apgd.n_iter, aa.apgd.n_restarts = self.iters, self.restarts
        aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes = self.iters, self.target_classes


ROBUST, CLEAN_WRONG = -1, 0  # `fell_at` codes; attack i of the cascade (0-based) is code i + 1
LOGGER = "auto-attack"


@dataclass(frozen=True)
class AAResult:
    """One AutoAttack evaluation. `fell_at[i]`: -1 robust, 0 misclassified clean, k fell to `attacks[k-1]`."""
    fell_at: np.ndarray
    attacks: tuple[str, ...]
    version: str
    norm: str
    eps: float
    seed: int
    warnings: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.fell_at.shape[0])

    @property
    def robust(self) -> np.ndarray:
        """Per-example bool: survived every attack."""
        return self.fell_at == ROBUST

    @property
    def clean(self) -> np.ndarray:
        return self.fell_at != CLEAN_WRONG

    @property
    def clean_acc(self) -> float:
        return float(self.clean.mean())

    @property
    def robust_acc(self) -> float:
        return float(self.robust.mean())

    @property
    def cascade(self) -> list[tuple[str, float]]:
        """[(attack, robust accuracy after it and all before it), ...] in run order (Rebuffi et al. 2021 Table 6)."""
        survived = [(self.fell_at == ROBUST) | (self.fell_at > code) for code in range(1, len(self.attacks) + 1)]
        return [(name, float(alive.mean())) for name, alive in zip(self.attacks, survived)]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fell_at"] = self.fell_at.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "AAResult":
        return cls(**{**d, "fell_at": np.asarray(d["fell_at"], dtype=np.int16), "attacks": tuple(d["attacks"]),
                      "warnings": tuple(d["warnings"])})


def aggregate(results: Sequence[AAResult]) -> AAResult:
    """The result over the concatenation of shards, in order (exact: every number follows from `fell_at`)."""
    if not results:
        raise EvalError("aggregate: no results given")
    keys = {(r.attacks, r.version, r.norm, r.eps, r.seed) for r in results}
    if len(keys) != 1:
        raise EvalError(f"aggregate: shards differ in (attacks, version, norm, eps, seed): {sorted(keys)}")
    warnings = tuple(dict.fromkeys(w for r in results for w in r.warnings))
    return dataclasses.replace(results[0], fell_at=np.concatenate([r.fell_at for r in results]),
                               warnings=warnings)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (before any compute).

def resolve_attacks(version: str, attacks: Sequence[str] | None) -> tuple[str, ...]:
    if version not in VERSIONS:
        raise EvalError(f"autoattack version: {version!r} is not one of {', '.join(VERSIONS)}")
    preset = VERSIONS[version]
    if preset is not None:
        if attacks is not None:
            raise EvalError(f"autoattack attacks: only with version='custom' (version={version!r} fixes them)")
        return preset
    if not attacks:
        raise EvalError(f"autoattack attacks: version='custom' needs a non-empty list from {', '.join(ATTACKS)}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or len(set(attacks)) != len(attacks):
        raise EvalError(f"autoattack attacks: {list(attacks)} must be distinct names from {', '.join(ATTACKS)}")
    return tuple(attacks)


def check_budget(version: str, budget: Budget) -> None:
    if budget != Budget() and version != "custom":
        raise EvalError(f"autoattack budget: only with version='custom' (version={version!r} fixes its own)")
    bad = [f"{k}={v}" for k, v in dataclasses.asdict(budget).items() if not isinstance(v, int) or v < 1]
    if bad:
        raise EvalError(f"autoattack budget: {', '.join(bad)} must be integers >= 1")


def aa_norm(norm: str) -> str:
    """pyautoattack's name for a raylab norm ("linf" -> "Linf"; the library's own spelling is accepted too)."""
    if not isinstance(norm, str) or norm.lower() not in AA_NORMS:
        raise EvalError(f"autoattack norm: {norm!r} is not one of {', '.join(AA_NORMS)}")
    return AA_NORMS[norm.lower()]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvalError(f"autoattack seed: {seed!r} must be an integer >= 0 (a fixed seed is required)")


# ---------------------------------------------------------------------------------------------------------------
# Capturing the library's warnings, confining its RNG use.

class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def captured_warnings(sink: list[str]) -> Iterator[None]:
    """Append every WARNING of the `auto-attack` logger to `sink` while inside; the handler is removed after."""
    logger = logging.getLogger(LOGGER)
    handler, level = _ListHandler(sink), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def private_rng(device: torch.device) -> Iterator[None]:
    """The library calls torch.manual_seed inside each attack: restore the caller's RNG state afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Resumable state: `fell_at` so far and the attacks done, written atomically after each attack.

def _identity(x: torch.Tensor, y: torch.Tensor, **settings) -> dict:
    """What the state file must match to be resumed: the settings and a hash of the exact inputs."""
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().cpu().numpy().tobytes())
    return {**settings, "n": int(x.shape[0]), "inputs_sha256": digest.hexdigest()}


def _budget_identity(budget: Budget) -> dict:
    """Part of the state's identity; absent at the defaults, so states written before the budget existed resume."""
    return {} if budget == Budget() else {"budget": dataclasses.asdict(budget)}


def _load_state(path: Path | None, identity: dict) -> dict | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("identity") != identity:
        raise EvalError(f"autoattack state_path: {path} belongs to another evaluation (settings or inputs "
                        "differ); delete it or choose another path")
    return state


def _save_state(path: Path | None, identity: dict, result: AAResult, done: list[str]) -> None:
    if path is not None:
        atomic_write_json(path, {"identity": identity, "done": done, "result": result.to_json()})


# ---------------------------------------------------------------------------------------------------------------
# The evaluation.

def _attack_survivors(aa: AutoAttack, attack: str, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> np.ndarray:
    """Run one attack of the cascade through the library on (x, y); bool per row: still classified correctly."""
    aa.attacks_to_run = [attack]
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return (y_adv.cpu() == y.cpu()).numpy()


def _build(model: nn.Module, norm: str, eps: float, version: str, attacks: tuple[str, ...], seed: int,
           device: torch.device, budget: Budget) -> AutoAttack:
    if version == "custom":
        aa = AutoAttack(model, norm=aa_norm(norm), eps=eps, version="custom", attacks=list(attacks), seed=seed,
                        device=device)
        budget.apply(aa)
        return aa
    return AutoAttack(model, norm=aa_norm(norm), eps=eps, version=version, seed=seed, device=device)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf", eps: float,
                   version: str = "standard", attacks: Sequence[str] | None = None, seed: int, batch_size: int,
                   state_path: str | Path | None = None, budget: Budget = Budget()) -> AAResult:
    """AutoAttack `version` ("standard", "plus", or "custom" with `attacks`) on (x, y) at `norm`/`eps`.

    x: float NCHW in [0, 1] (normalization inside the model); y: int64. The model must be in eval mode and give
    deterministic logits. With `state_path` the evaluation resumes after the last finished attack (the state
    records a hash of x and y and every setting; it cannot know the model, so keep it beside the checkpoint).
    """
    require_eval_mode(model)
    check_images(x, y)
    check_batch_size(batch_size)
    check_eps(eps)
    _check_seed(seed)
    check_budget(version, budget)
    names, norm = resolve_attacks(version, attacks), aa_norm(norm).lower()
    path = Path(state_path) if state_path is not None else None
    identity = _identity(x, y, norm=norm, eps=eps, version=version, attacks=list(names), seed=seed,
                         batch_size=batch_size, **_budget_identity(budget))
    state = _load_state(path, identity)
    if state is not None:
        result, done = AAResult.from_json(state["result"]), list(state["done"])
    else:
        fell = np.where(correct_flags(model, x, y, batch_size=batch_size).numpy(), ROBUST, CLEAN_WRONG)
        result, done = AAResult(fell.astype(np.int16), names, version, norm, float(eps), seed), []
    return _run_cascade(model, x, y, result, done, batch_size, path, identity, budget)


def _run_cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: AAResult, done: list[str],
                 batch_size: int, path: Path | None, identity: dict, budget: Budget) -> AAResult:
    """Attack the still-robust points with each remaining attack in order, saving the state after each."""
    device = model_device(model)
    sink = list(result.warnings)
    with captured_warnings(sink), private_rng(device):
        aa = _build(model, result.norm, result.eps, result.version, result.attacks, result.seed, device, budget)
        for code, attack in enumerate(result.attacks, start=1):
            if attack in done:
                continue
            alive = np.flatnonzero(result.fell_at == ROBUST)
            fell = result.fell_at.copy()
            if alive.size:  # the library also stops once nothing is left to attack
                idx = torch.from_numpy(alive)
                fell[alive[~_attack_survivors(aa, attack, x[idx], y[idx], batch_size)]] = code
            result = dataclasses.replace(result, fell_at=fell, warnings=tuple(dict.fromkeys(sink)))
            done.append(attack)
            _save_state(path, identity, result, done)
        # The Square check needs the whole cascade, which the per-attack calls never show the library.
        aa_checks.check_square_sr({"clean": result.clean_acc, **dict(result.cascade)},
                                  logger=logging.getLogger(LOGGER))
    result = dataclasses.replace(result, warnings=tuple(dict.fromkeys(sink)))
    _save_state(path, identity, result, done)
    return result


# ---------------------------------------------------------------------------------------------------------------
# A single APGD-CE run (Rebuffi et al. 2021 App. C, Fig. 10: 1 restart, K steps), for the gradient-masking checks.

def apgd_ce_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int = 100,
                  seed: int, batch_size: int) -> torch.Tensor:
    """Per-example bool: correct on x and on APGD-CE's adversarial example (1 restart, `steps` iterations)."""
    require_eval_mode(model)
    check_images(x, y)
    check_batch_size(batch_size)
    check_eps(eps)
    _check_seed(seed)
    device = model_device(model)
    clean = correct_flags(model, x, y, batch_size=batch_size)
    if eps == 0:
        return clean
    flags = []
    with private_rng(device):
        apgd = APGDAttack(model, n_iter=steps, norm=aa_norm(norm), n_restarts=1, eps=eps, seed=seed, loss="ce",
                          device=device, logger=logging.getLogger(LOGGER))
        for s in batch_slices(len(x), batch_size):
            xb, yb = x[s].to(device), y[s].to(device)
            with torch.no_grad():
                flags.append((model(apgd.perturb(xb, yb)).argmax(1) == yb).cpu())
    return clean & torch.cat(flags)
