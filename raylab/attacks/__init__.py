"""Attacks: per-norm primitives (`ops.NORMS`) and one PGD loop with pluggable objectives (`pgd.OBJECTIVES`).

The caller chooses the model mode with `eval_mode(model)` or `frozen_bn(model)` (`ATTACK_MODES` by config name).
"""
from raylab.attacks.ops import NORMS, NormOps, clamp01, draw, to_feasible
from raylab.attacks.pgd import (ATTACK_MODES, OBJECTIVES, AttackError, eval_mode, frozen_bn, pgd,
                                register_objective)

__all__ = ["ATTACK_MODES", "AttackError", "NORMS", "NormOps", "OBJECTIVES", "clamp01", "draw", "eval_mode", "frozen_bn",
           "pgd", "register_objective", "to_feasible"]
