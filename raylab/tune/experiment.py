"""What every `experiments/ablate_*.py` script shares: three presets, `--set` overrides, one sweep call.

- no arguments (`--preset tiny`): the embedded default (digits, the committed tiny EDM and scorer, 2 CPU cores,
  offline);
- `--preset smoke` (or `--smoke`): the same, smaller still (CI runs it);
- `--preset paper`: the papers' values for a GPU cluster (`ray job submit -- python experiments/... --preset paper`).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from raylab.amounts import check_amount
from raylab.config import ExperimentConfig, override, parse_assignments, to_flat
from raylab.knobs import ConfigError, bad_input
from raylab.presets import dataset_values, make_config, miniature, shrink_key
from raylab.tune.sweep import Coupling

# The embedded main job (`python experiments/ablate_steps.py`): the tiny preset with half the generated images, so
# that three arms fit 10 minutes on 2 cores.
MAIN_JOB: dict[str, Any] = {"generate.per_class": 30}


@dataclass(frozen=True)
class Ablation:
    """One swept key with its values per preset, plus overrides that make the ablation match its paper table."""
    key: str
    values: dict[str, Sequence[Any]]  # per preset: "tiny", "smoke", "paper"
    title: str
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per preset: the experiment's defaults
    # (for paper: its table's setting on CIFAR-10; on another dataset that dataset's own values win, presets.py)
    layout: str | None = None
    coupled: dict[str, Coupling] = field(default_factory=dict)  # per preset: keys that follow the swept value


def parse_args(ablation: Ablation, argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser(ablation).parse_args(argv)


def build_parser(ablation: Ablation) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=ablation.title)
    parser.add_argument("--preset", choices=("tiny", "smoke", "paper"), default="tiny",
                        help="tiny (2 CPU cores, the default), smoke (CI), paper (GPU cluster); as every verb's")
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    parser.add_argument("--miniature", action="store_true", help="with --preset paper: every paper knob, only the "
                        "sizes shrunk (raylab.presets.MINIATURE), for a dress rehearsal on CPUs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--values", default=None, help=f"comma-separated values of {ablation.key}")
    parser.add_argument("--plan", action="store_true", help="print what the sweep would generate, keep, train and "
                        "spend (device-hours), and exit")
    parser.add_argument("--verbose", action="store_true", help="also Ray's and Tune's own output (Tune's status and "
                        "result tables, Ray Train's and Ray Data's INFO lines)")
    return parser


@dataclass(frozen=True)
class Composed:
    """What an experiment runs: the base config, the swept values, and the keys that follow each value."""
    cfg: ExperimentConfig
    values: list[Any]
    coupled: Optional[Coupling] = None
    dropped: tuple = ()  # default values the dataset cannot supply (e.g. 20M images of CIFAR-100's 5M)


def compose(ablation: Ablation, mode: str, overrides: dict[str, Any], values: Sequence[Any] | None = None,
            small: bool = False) -> Composed:
    """The experiment for preset tiny/smoke/paper, user overrides last (`raylab.presets.make_config` layers). A
    coupled key (the amount ablation's selection and ratio) yields to the dataset's own value and to --set. Default
    values beyond what the dataset's generation supplies are dropped; `values` given by the user are refused.
    `small`: the paper's miniature, resolved at full size and then shrunk, swept values included."""
    if small and mode != "paper":
        raise ConfigError(f"--miniature: shrinks the paper preset, not {mode!r} (use --preset paper --miniature)")
    defaults = {"sweep.name": ablation.key.split(".")[-1], **ablation.overrides.get(mode, {})}
    cfg = make_config(mode, overrides, defaults)
    coupled = _yielding(ablation.coupled.get(mode), {*dataset_values(mode, {**defaults, **overrides}), *overrides})
    chosen = [to_flat(override(cfg, {ablation.key: v}))[ablation.key] for v in
              (ablation.values[mode] if values is None else values)]
    fits = [v for v in chosen if _fits(cfg, ablation.key, v, coupled, strict=values is not None)]
    dropped = tuple(v for v in chosen if v not in fits)
    if not small:
        return Composed(cfg, fits, coupled, dropped)
    full = {shrink_key(ablation.key, v): v for v in fits}  # each miniature value's full-size value
    small_rule = None if coupled is None else (
        lambda v: {k: shrink_key(k, x) for k, x in coupled(full[v]).items()})
    return Composed(miniature(cfg, overrides), list(full), small_rule, dropped)


def _yielding(rule: Optional[Coupling], fixed: set) -> Optional[Coupling]:
    if rule is None:
        return None
    return lambda value: {k: v for k, v in rule(value).items() if k not in fixed}


def _fits(cfg: ExperimentConfig, key: str, value: Any, coupled: Optional[Coupling], strict: bool) -> bool:
    """The arm's config is valid and its amount available; a user's value that is not is refused in one line."""
    arm = override(cfg, {key: value, **(coupled(value) if coupled else {})})
    try:
        check_amount(arm)
    except ConfigError:
        if strict:
            raise
        return False
    return True


def run_ablation(ablation: Ablation, argv: Sequence[str] | None = None) -> int:
    from raylab.cluster import terminal
    from raylab.preempt import PREEMPTED_EXIT, Preempted
    from raylab.tune.sweep import SweepError, run_sweep

    ns = parse_args(ablation, argv)
    mode = "smoke" if ns.smoke else ns.preset
    try:
        run = compose(ablation, mode, parse_assignments(ns.overrides),
                      [v.strip() for v in ns.values.split(",")] if ns.values else None, ns.miniature)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    cfg, values = run.cfg, run.values
    if run.dropped:
        print(f"{ablation.key}: {', '.join(map(str, run.dropped))} left out: more generated images than "
              f"{cfg.data.dataset}'s generation supplies (generate.per_class={cfg.generate.per_class:,})")
    if ns.plan:
        from raylab.cost import make_plan

        print("\n".join(make_plan(cfg, {ablation.key: values}, run.coupled).lines()))
        return 0
    print(f"{ablation.title}: {ablation.key} in {values} ({mode}; runs under {cfg.tracking.root})", flush=True)
    try:
        with terminal(ns.verbose):
            out = run_sweep(cfg, {ablation.key: values}, layout=ablation.layout, coupled=run.coupled,
                            verbose=ns.verbose)
    except SweepError as err:
        print(f"error: {err}")
        return 1
    except Preempted as err:  # checkpointed on SIGTERM: the sbatch script requeues on this status
        print(f"stopped: {err}", flush=True)
        return PREEMPTED_EXIT
    except KeyboardInterrupt as err:  # Ctrl-C: Tune kept its state; the same command restores the sweep
        kept = str(err) or "Tune's state and every finished trial are kept"
        print(f"interrupted: {kept}; resume with: python {' '.join(map(shlex.quote, sys.argv))}", flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - bad input (a SharedRootError too) is one line; a bug keeps its trace
        if bad_input(err) is None:
            raise
        print(f"error: {' '.join(str(bad_input(err)).split())}")
        return 2
    print(f"\nsweep {out.name}: {len(out.rows)} trials; MLflow parent run {out.parent_run_id}")
    print(f"compare the runs: raylab ui --set tracking.root={cfg.tracking.root}  (then open the printed URL)")
    return 0
