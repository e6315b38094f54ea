"""The dress rehearsal's job: the paper configuration in miniature (`--preset paper --miniature`), end to end on a
cluster, as `raylab rehearse --dress` submits it.

`python -m raylab.rehearse.dress --set data.root=... --set tracking.root=... --set tracking.uri=...`
1. trains what the paper takes as given, the generator (an EDM of the DDPM++ family) and the scorer (a standard
   WRN), on the dataset under data.root;
2. runs `experiments/ablate_steps.py` and `experiments/ablate_amount.py` with `--preset paper --miniature`: the
   steps table's 20-step row, and two amounts on both sides of the paper's rules (top 20% and ratio 0.3 up to 1M,
   all images and 0.2 above);
3. prints how what each trial ran differs from `--preset paper` (read back from MLflow) and fails if anything but
   a MINIATURE size key, the swept key, a location or one of the two trained inputs differs.
"""
from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from typing import Any, Sequence

from raylab.config import LOCATION_KEYS, ExperimentConfig, from_flat, override, parse_assignments, to_flat
from raylab.presets import MINIATURE, make_config, miniature

# Table 7's row at the paper's 20 steps; Table 5's amounts on both sides of the paper's rules (top 20% and ratio 0.3
# up to 1M, every image and 0.2 above). Three trials keep the rehearsal within CI's budget.
EXPERIMENTS = {"ablate_steps": ["20"], "ablate_amount": ["1000000", "5000000"]}
INPUT_KEYS = ("generate.checkpoint", "select.scorer_checkpoint")  # what step 1 trains
ALLOWED_SETS = LOCATION_KEYS  # the job's own --set may only say where things are


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the paper configuration in miniature, end to end")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"locations only ({', '.join(ALLOWED_SETS)})")
    return parser.parse_args(argv)


def locations(argv: Sequence[str] | None) -> dict[str, str]:
    sets = parse_assignments(parse_args(argv).overrides)
    other = [k for k in sets if not any(k == p or k.startswith(p + ".") for p in ALLOWED_SETS)]
    if other:
        raise SystemExit(f"dress: --set {other[0]}: the dress rehearsal keeps every paper knob; only locations "
                         f"({', '.join(ALLOWED_SETS)}) may be set")
    return sets


def train_inputs(cfg: ExperimentConfig) -> dict[str, str]:
    """The generator and the scorer, trained on the cluster like any run (resumed when rerun)."""
    from raylab.cluster import init_ray
    from raylab.train.edm_worker import train_edm
    from raylab.train.job import run_scorer_training

    init_ray(shared_root=cfg.tracking.root)
    edm = train_edm(cfg)
    print(f"dress: generator {edm.network_dir} (final loss {edm.final_loss:.4f})", flush=True)
    scorer = run_scorer_training(cfg)
    print(f"dress: scorer {scorer.run.path / 'best.pt'} (best epoch {scorer.best.get('epoch')})", flush=True)
    return {"generate.checkpoint": str(edm.network_dir), "select.scorer_checkpoint": str(scorer.run.path / "best.pt")}


def run_experiment(name: str, values: list[str], sets: dict[str, str]) -> int:
    """`python experiments/<name>.py --preset paper --miniature ...` in its own process, as a user runs it."""
    argv = [sys.executable, f"experiments/{name}.py", "--preset", "paper", "--miniature", "--values",
            ",".join(values), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    print(f"dress: {' '.join(argv[1:])}", flush=True)
    return subprocess.run(argv).returncode


def trial_configs(cfg: ExperimentConfig, sweep: str) -> list[dict[str, Any]]:
    """The flat configs the sweep's trials logged to MLflow (params are strings)."""
    from raylab.tracking import find_runs, resolve_tracking_uri

    runs = find_runs(resolve_tracking_uri(cfg.tracking), cfg.tracking.experiment,
                     f"tags.`raylab.stage` = 'train' and tags.`raylab.sweep` LIKE '{sweep}-%'")
    return [dict(r.params) for r in runs]


def differences(name: str, sets: dict[str, str], trials: list[dict[str, Any]]) -> tuple[dict, list[str]]:
    """({key: ({paper values}, {miniature values})} over every trial, [keys that differ and may not]). Each trial is
    compared with its own arm at full size: `--preset paper` with the same inputs, the full-size value of the swept
    key and the keys coupled to it."""
    from raylab.tune.experiment import compose

    ablation = runpy.run_path(f"experiments/{name}.py", run_name="not_main")["ABLATION"]
    full = compose(ablation, "paper", sets, EXPERIMENTS[name])
    small = compose(ablation, "paper", sets, EXPERIMENTS[name], small=True)
    full_value = dict(zip(small.values, full.values))
    found: dict[str, tuple[set, set]] = {}
    known = set(to_flat(full.cfg))
    for params in trials:
        ran = to_flat(from_flat({k: v for k, v in params.items() if k in known}))
        value = full_value[ran[ablation.key]]
        arm = to_flat(override(full.cfg, {ablation.key: value, **(full.coupled(value) if full.coupled else {})}))
        for key in arm:
            if ran[key] != arm[key] and not any(key == p or key.startswith(p + ".") for p in LOCATION_KEYS):
                full_set, small_set = found.setdefault(key, (set(), set()))
                full_set.add(arm[key])
                small_set.add(ran[key])
    return found, sorted(k for k in found if k not in {*MINIATURE, ablation.key})


def _values(values: set) -> str:
    return ",".join(map(str, sorted(values, key=lambda v: (str(type(v)), v))))


def main(argv: Sequence[str] | None = None) -> int:
    sets = locations(argv)
    cfg = miniature(make_config("paper", sets), sets)
    inputs = train_inputs(cfg)
    failed = []
    for name, values in EXPERIMENTS.items():
        if run_experiment(name, values, {**sets, **inputs}):
            failed.append(f"{name} exited non-zero")
            continue
        sweep = name.removeprefix("ablate_")
        found, wrong = differences(name, {**sets, **inputs}, trial_configs(cfg, sweep))
        print(f"dress: {name} vs --preset paper: " + "; ".join(
            f"{k} {_values(paper)} -> {_values(small)}" for k, (paper, small) in sorted(found.items())),
              flush=True)
        failed += [f"{name}: {k} differs from --preset paper and is not a size" for k in wrong]
    for line in failed:
        print(f"dress: FAILED {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
