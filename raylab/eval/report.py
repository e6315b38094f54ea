"""Evaluation results as plain data, metric names and tables: what `raylab eval` prints, saves and logs.

Pure: no Ray, no MLflow, no files. Every number derives from per-example flags in test-set order (`EvalResult`),
so a sharded evaluation and one process over the same chunks produce the same table character for character.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from raylab.eval.autoattack import ROBUST, AAResult
from raylab.eval.checks import CheckReport
from raylab.eval.metrics import wilson_interval

# Certified accuracy is tabulated at these multiples of sigma (Cohen et al. 2019 report radii up to ~4 sigma)
# and drawn on a finer grid of the same span.
CERT_TABLE_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
CERT_CURVE_POINTS = 41


def pgd_metric_name(steps: int, prefix: str = "eval_") -> str:
    """`eval_pgd40_acc` for the papers' PGD-40; the step count is part of the name so PGD-10 never poses as it."""
    return f"{prefix}pgd{steps}_acc"


def aa_metric_name(version: str, attacks: Sequence[str], prefix: str = "eval_") -> str:
    """`eval_aa_standard_acc` for standard AutoAttack, `eval_aa_plus_acc`, and for a custom cascade its attacks
    (`eval_aa_apgd-ce.apgd-t_acc`; MLflow allows no '+' or ',' in names): a cheaper AutoAttack never poses as the
    papers' number."""
    name = ".".join(attacks) if version == "custom" else version
    return f"{prefix}aa_{name}_acc"


def metric_prefix(checkpoint: str) -> str:
    """`eval_` for the best checkpoint (or a file), `eval_last_` for last.pt: both land in the training run, often
    at the same step (the epoch), and must not overwrite each other (Wang et al. 2023 Tables 4-5 report both)."""
    return "eval_last_" if checkpoint == "last" else "eval_"


def format_eps(eps: float, norm: str) -> str:
    """'8/255 (0.03137)' for L-inf radii on the 1/255 grid, else the number."""
    k = eps * 255
    if norm == "linf" and eps > 0 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255 ({eps:.5f})"
    return f"{eps:.5g}"


def radius_grid(sigma: float, points: int = CERT_CURVE_POINTS) -> list[float]:
    return [float(r) for r in np.linspace(0.0, 4.0 * sigma, points)]


# ---------------------------------------------------------------------------------------------------------------
# Data.

@dataclass(frozen=True)
class EvalHeader:
    """What was evaluated and how: printed above the table, saved and logged with it."""
    model: str
    dataset: str
    checkpoint: str                 # "best", "last", or a checkpoint file's name
    epoch: Optional[int]
    norm: str
    eps: float
    autoattack: str                 # AutoAttack version, or "none"
    attacks: tuple[str, ...]
    pgd_steps: int
    seed: int
    chunk_size: int
    certify_sigma: Optional[float] = None
    trained: Optional[tuple[str, float]] = None  # the training attack's (norm, eps), when the run is known
    transfer: bool = False                       # eval.transfer: a different threat model is intended
    aa_budget: str = ""                          # the custom version's reduced budget (autoattack.Budget.label)

    def mismatch(self) -> Optional[str]:
        """'trained against linf eps=8/255, evaluated against l2 eps=0.5' when the threat models differ."""
        if self.trained is None:
            return None
        norm, eps = self.trained
        if norm == self.norm and math.isclose(eps, self.eps, rel_tol=1e-9, abs_tol=1e-12):
            return None
        return (f"trained against {norm} eps={format_eps(eps, norm)}, evaluated against {self.norm} "
                f"eps={format_eps(self.eps, self.norm)}")

    def lines(self, n: int) -> list[str]:
        epoch = f" (epoch {self.epoch})" if self.epoch is not None else ""
        budget = f"; {self.aa_budget}" if self.aa_budget else ""
        aa = "off" if self.autoattack == "none" else f"version {self.autoattack} [{', '.join(self.attacks)}{budget}]"
        lines = [f"evaluation of {self.model} on {self.dataset}, checkpoint {self.checkpoint}{epoch}, "
                 f"{n} test images",
                 f"threat model: {self.norm} eps={format_eps(self.eps, self.norm)}; AutoAttack {aa}; "
                 f"PGD-{self.pgd_steps} (margin loss, 1 random start); seed {self.seed}; "
                 f"chunks of {self.chunk_size}"]
        if self.certify_sigma is not None:
            lines.append(f"certification: randomized smoothing, sigma={self.certify_sigma:g} (L2 radii)")
        return lines


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class EvalResult:
    """Per-example outcomes over the evaluated test images, in order. `clean`/`pgd` are bool arrays."""
    header: EvalHeader
    labels: np.ndarray
    clean: np.ndarray
    pgd: np.ndarray
    aa: Optional[AAResult] = None
    cert_preds: Optional[np.ndarray] = None
    cert_radii: Optional[np.ndarray] = None
    checks: tuple[CheckReport, ...] = ()

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_acc(self) -> float:
        return float(self.clean.mean())

    @property
    def pgd_acc(self) -> float:
        return float(self.pgd.mean())

    @property
    def aa_acc(self) -> Optional[float]:
        return None if self.aa is None else self.aa.robust_acc

    def certified_curve(self, radii: Sequence[float] | None = None) -> list[tuple[float, float]]:
        """[(r, fraction certified correct with radius >= r)], or [] without certification
        (Sehwag et al. 2022 Fig. 2)."""
        if self.cert_preds is None or self.header.certify_sigma is None:
            return []
        grid = radius_grid(self.header.certify_sigma) if radii is None else radii
        correct = self.cert_preds == self.labels
        return [(float(r), float((correct & (self.cert_radii >= r)).mean())) for r in grid]

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        """Flat MLflow metrics: eval_clean_acc, eval_pgd{k}_acc, eval_aa_<version>_acc, eval_aa_after_<attack>,
        eval_cert_acc_r<radius>, eval_check_<name>_passed, eval_num_test (with `prefix` for eval_)."""
        out = {f"{prefix}clean_acc": self.clean_acc, pgd_metric_name(self.header.pgd_steps, prefix): self.pgd_acc,
               f"{prefix}num_test": float(self.n)}
        if self.aa is not None:
            out[aa_metric_name(self.header.autoattack, self.header.attacks, prefix)] = self.aa.robust_acc
            out.update({f"{prefix}aa_after_{name}": acc for name, acc in self.aa.cascade})
        sigma = self.header.certify_sigma
        if sigma is not None:
            out.update({f"{prefix}cert_acc_r{r:g}": acc
                        for r, acc in self.certified_curve([m * sigma for m in CERT_TABLE_MULTIPLES])})
        out.update({f"{prefix}check_{c.name}_passed": float(c.passed) for c in self.checks})
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The result table as rows {metric, accuracy, correct, n}."""
        rows = [_row("clean", self.clean), _row(f"PGD-{self.header.pgd_steps}", self.pgd)]
        if self.aa is not None:
            if len(self.aa.attacks) > 1:
                rows += [_row(f"  after {name}", _alive_after(self.aa, k)) for k, name in
                         enumerate(self.aa.attacks, start=1)]
            rows.append(_row(f"AutoAttack ({self.aa.version})", self.aa.robust))
        sigma = self.header.certify_sigma
        if self.cert_preds is not None and sigma is not None:
            correct = self.cert_preds == self.labels
            rows += [_row(f"certified r={m * sigma:g}", correct & (self.cert_radii >= m * sigma))
                     for m in CERT_TABLE_MULTIPLES]
        return rows

    def warnings(self) -> list[str]:
        """Lines that must not be missed: failed gradient-masking checks, AutoAttack's own sanity warnings,
        and inconsistencies between the attacks."""
        lines = [f"WARNING gradient-masking check {c.name} FAILED: {c.message}" for c in self.checks
                 if not c.passed]
        mismatch = self.header.mismatch()
        if mismatch:  # a robust accuracy at another norm/eps is not the one the paper tables report
            lines.append(f"transfer evaluation: {mismatch} (eval.transfer=true)" if self.header.transfer else
                         f"WARNING threat model mismatch: {mismatch}; these are not the model's robust accuracies"
                         " at its own threat model (set eval.norm/eval.eps, or eval.transfer=true if intended)")
        if self.aa is None:
            return lines
        lines += [f"WARNING AutoAttack: {w}" for w in self.aa.warnings]
        differ = int((self.aa.clean != self.clean).sum())
        if differ:
            lines.append(f"WARNING clean predictions differ between the clean pass and AutoAttack on {differ} "
                         "images: a randomized or input-dependent (dynamic) model makes every number unreliable")
        if self.aa.robust_acc > self.pgd_acc:
            lines.append(f"WARNING AutoAttack accuracy {self.aa.robust_acc:.2%} is above PGD-"
                         f"{self.header.pgd_steps} accuracy {self.pgd_acc:.2%}: the stronger attack did worse "
                         "(too few images, or an attack being masked)")
        return lines

    def to_json(self) -> dict[str, Any]:
        """Summary for `summary.json` and the MLflow artifact (no per-example arrays)."""
        return {"header": dataclasses.asdict(self.header), "n": self.n,
                "metrics": self.metrics(metric_prefix(self.header.checkpoint)), "rows": self.rows(),
                "warnings": self.warnings(), "certified_curve": self.certified_curve(),
                "checks": [c.to_json() for c in self.checks]}


def _alive_after(aa: AAResult, code: int) -> np.ndarray:
    """Per-example bool: still robust after the first `code` attacks of the cascade."""
    return (aa.fell_at == ROBUST) | (aa.fell_at > code)


def _row(metric: str, flags: np.ndarray) -> dict[str, Any]:
    n = int(flags.shape[0])
    correct = int(np.asarray(flags, bool).sum())
    return {"metric": metric, "accuracy": correct / n if n else math.nan, "correct": correct, "n": n}


# ---------------------------------------------------------------------------------------------------------------
# Text.

def _interval(row: dict[str, Any]) -> str:
    low, high = wilson_interval(row["accuracy"], row["n"])
    return "-" if math.isnan(low) else f"[{100 * low:.1f}, {100 * high:.1f}]"


def format_table(result: EvalResult, notes: Sequence[str] = ()) -> str:
    """The printed report: header lines, the table, then notes and warnings (one per line)."""
    rows = result.rows()
    width = max(len(r["metric"]) for r in rows) + 2
    lines = result.header.lines(result.n)
    lines.append(f"{'metric':<{width}}{'accuracy':>10}{'95% Wilson':>16}{'correct / n':>16}")
    lines += [f"{r['metric']:<{width}}{r['accuracy']:>10.2%}{_interval(r):>16}{r['correct']:>9} / {r['n']:<5}"
              for r in rows]
    lines += [f"check {c.name}: passed ({c.message})" for c in result.checks if c.passed]
    lines += list(notes) + result.warnings()
    return "\n".join(lines)
