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
from typing import Any, Callable, Sequence

from raylab.config import ConfigError, parse_assignments
from raylab.presets import make_config

# The embedded main job (`python experiments/ablate_steps.py`): the tiny preset with half the generated images, so
# that three arms fit 10 minutes on 2 cores.
MAIN_JOB: dict[str, Any] = {"generate.per_class": 30}
# Wang et al. 2023's standard data: 5M EDM images per class set, top 20% kept per class by the scorer = 1M.
PAPER_1M: dict[str, Any] = {"generate.per_class": 500_000, "select.top_fraction": 0.2}
# A GPU cluster at paper scale: 4 GPU workers per trial, GPU sampler/scorer/eval actors. The scorer is a WRN-28-10
# over 5M images: on a GPU, not a CPU actor. Spot GPU nodes vanish: each Train run and Tune trial may restart 3 times
# (from its last checkpoint) before the sweep fails.
CLUSTER: dict[str, Any] = {
    "resources.use_gpu": True, "resources.num_workers": 4, "resources.gpus_per_actor": 1.0,
    "resources.sampler_actors": 4, "resources.scorer_actors": 1, "resources.scorer_gpus_per_actor": 1.0,
    "resources.eval_actors": 4, "resources.max_failures": 3, "train.bf16": True,
}


@dataclass(frozen=True)
class Ablation:
    """One swept key with its values per preset, plus overrides that make the ablation match its paper table."""
    key: str
    values: dict[str, Sequence[Any]]  # per preset: "tiny", "smoke", "paper"
    title: str
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str | None = None
    coupled: dict[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)  # per preset: keys that
    # follow the swept value (`raylab.tune.sweep.Coupling`)


def parse_args(ablation: Ablation, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=ablation.title)
    parser.add_argument("--preset", choices=("tiny", "smoke", "paper"), default="tiny",
                        help="tiny (2 CPU cores, the default), smoke (CI), paper (GPU cluster); as every verb's")
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--values", default=None, help=f"comma-separated values of {ablation.key}")
    parser.add_argument("--plan", action="store_true", help="print what the sweep would generate, keep, train and "
                        "spend (device-hours), and exit")
    return parser.parse_args(argv)


def compose(ablation: Ablation, mode: str, overrides: dict[str, Any]):
    """(config, values) of `ablation` for preset tiny/smoke/paper, with user overrides last."""
    flat = {**(CLUSTER if mode == "paper" else {}), "sweep.name": ablation.key.split(".")[-1],
            **ablation.overrides.get(mode, {}), **overrides}
    return make_config(mode, flat), list(ablation.values[mode])


def run_ablation(ablation: Ablation, argv: Sequence[str] | None = None) -> int:
    from raylab.cluster import SharedRootError, quiet_ray_chatter
    from raylab.tune.sweep import SweepError, run_sweep

    ns = parse_args(ablation, argv)
    mode = "smoke" if ns.smoke else ns.preset
    try:
        cfg, values = compose(ablation, mode, parse_assignments(ns.overrides))
        if ns.values:
            values = [v.strip() for v in ns.values.split(",")]
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    if ns.plan:
        from raylab.cost import make_plan

        print("\n".join(make_plan(cfg, {ablation.key: values}, ablation.coupled.get(mode)).lines()))
        return 0
    print(f"{ablation.title}: {ablation.key} in {values} ({mode}; runs under {cfg.tracking.root})", flush=True)
    try:
        with quiet_ray_chatter():
            out = run_sweep(cfg, {ablation.key: values}, layout=ablation.layout,
                            coupled=ablation.coupled.get(mode))
    except SweepError as err:
        print(f"error: {err}")
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C: Tune kept its state; the same command restores the sweep
        kept = str(err) or "Tune's state and every finished trial are kept"
        print(f"interrupted: {kept}; resume with: python {' '.join(map(shlex.quote, sys.argv))}", flush=True)
        return 130
    except SharedRootError as err:
        print(f"error: {err}")
        return 2
    print(f"\nsweep {out.name}: {len(out.rows)} trials; MLflow parent run {out.parent_run_id}")
    print(f"compare the runs: raylab ui --set tracking.root={cfg.tracking.root}  (then open the printed URL)")
    return 0
