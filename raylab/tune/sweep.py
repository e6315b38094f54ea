"""Sweeps on Ray Tune: any flat config keys, each trial a full run, every trial a nested MLflow run.

A trial is: ensure its generated view exists (content-addressed, shared across trials and sweeps) -> adversarial
training on Ray Train (reporting per epoch to Tune through `TuneReportCallback`) -> evaluation of the best and last
checkpoints -> one final Tune report. Trial drivers hold the custom `trial_driver` resource, not a CPU: a 2-worker
trial plus its driver would not fit 2 CPUs (reference/ray_mlflow.md §3). An interrupted sweep is restored with
`Tuner.restore` and does not rerun finished trials; a restored trial resumes its Ray Train run (stable names).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from raylab.amounts import check_amount
from raylab.config import ExperimentConfig, from_flat, identity_flat, override, pin_paths, to_flat, to_json
from raylab.cost import ledger
from raylab.io import atomic_write_text
from raylab.runs import write_config

PARENT_FILE = "mlflow_parent_run_id"
NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"  # Tune's switch between its output engines (_tune_output)
FD_METRIC = "fd_scorer_features"  # the generation's Frechet distance on scorer features (not Inception FID)
# Keys that follow the swept value of a one-key sweep (a paper rule: Wang et al. 2023 Table 5 selects the top 20%
# and mixes at 0.3 up to 1M generated images, takes all of them at 0.2 above): value -> {key: value}.
Coupling = Callable[[Any], dict[str, Any]]


class SweepError(RuntimeError):
    """A sweep finished with failed trials (their errors are in the Tune results and the trials' MLflow runs)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep: Tune saved its state (rerunning the same command restores it), the parent run
    ended KILLED."""


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    path: Path
    parent_run_id: str
    rows: list[dict[str, Any]]
    table: str


def _coupled_table(space: dict[str, Sequence[Any]], coupled: Optional[Coupling]) -> dict[str, dict]:
    if coupled is None:
        return {}
    (values,) = space.values()
    return {str(v): coupled(v) for v in values}


def sweep_name(cfg: ExperimentConfig, space: dict[str, Sequence[Any]], coupled: Optional[Coupling] = None) -> str:
    """Deterministic: rerunning the same sweep finds (and restores) it; another config or space is another sweep."""
    text = json.dumps({"config": identity_flat(cfg), "space": {k: list(v) for k, v in space.items()},
                       **({"coupled": _coupled_table(space, coupled)} if coupled else {})}, sort_keys=True,
                      default=str)
    return f"{cfg.sweep.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def sweep_dir(cfg: ExperimentConfig, space: dict[str, Sequence[Any]], coupled: Optional[Coupling] = None) -> Path:
    """`<tracking.root>/tune/<sweep name>/`, Tune's experiment directory, created holding the resolved base config
    (`config.json`; the swept keys are in the MLflow parent run's `sweep_space.json`)."""
    path = Path(cfg.tracking.root).resolve() / "tune" / sweep_name(cfg, space, coupled)
    write_config(path, cfg)
    return path


def check_space(cfg: ExperimentConfig, space: dict[str, Sequence[Any]],
                coupled: Optional[Coupling] = None) -> list[ExperimentConfig]:
    """Every value of every swept key (with the keys coupled to it) makes a valid config: fail before any compute,
    naming the key. Returns those configs."""
    if not space:
        raise ValueError("sweep: the search space is empty (name at least one key and its values)")
    if coupled is not None and len(space) != 1:
        raise ValueError(f"sweep: coupled keys follow one swept key, not {len(space)} ({', '.join(space)})")
    arms = []
    for key, values in space.items():
        if not list(values):
            raise ValueError(f"{key}: the sweep gives it no values")
        arms += [override(cfg, {key: value, **(coupled(value) if coupled else {})}) for value in values]
    for arm in arms:
        check_amount(arm)
    return arms


def check_inputs(arms: Sequence[ExperimentConfig]) -> None:
    """In the driver, before Tune starts, once per distinct input: each arm's dataset files and, for arms that train
    on generated data, what generating and selecting them needs (raylab.tune.artifacts.check_view_inputs)."""
    from raylab.data.datasets import check_dataset
    from raylab.tune.artifacts import check_view_inputs

    for arm in {(a.data, a.select, a.generate.inception_weights, a.train.ratio < 1): a for a in arms}.values():
        if arm.train.ratio < 1:
            check_view_inputs(arm)
        else:
            check_dataset(arm.data)


# ---------------------------------------------------------------------------------------------------------------
# One trial (runs inside a Tune trial actor).

def run_trial(trial_config: dict[str, Any], *, flat: dict[str, Any], parent_run_id: str, sweep: str,
              swept: Sequence[str] = (), stop_file: Optional[str] = None) -> None:
    """One trial: `trial_config` holds only the swept keys and the keys coupled to them (what Tune shows); the base
    config, the sweep's MLflow parent run, its name, its swept keys (the trial's run name) and the driver's stop
    file (raylab.preempt) come through `tune.with_parameters`."""
    import ray.data

    from raylab import preempt
    from raylab.cluster import drop_stats_actor_errors, labelled

    if stop_file:
        os.environ[preempt.STOP_ENV] = stop_file
    if preempt.stop_requested():  # a trial Tune starts after the request: not even its generation
        raise preempt.Preempted(preempt.stop_line("trial"))

    # Each stage's own line is the trial's progress; Ray Data's bars from inside trials (generation, ingest, eval)
    # flooded the main job's log with 3,000+ lines. Datasets carry this context to their executions.
    ray.data.DataContext.get_current().enable_progress_bars = False
    drop_stats_actor_errors()
    cfg = from_flat(flat | {k: v for k, v in trial_config.items() if "." in k})
    label = trial_label(cfg, swept or trial_config)
    with labelled(f"[{label}] "):  # the generation's line and the evaluation's table say which arm they are
        _run_trial(cfg, label, parent_run_id, sweep)


def _run_trial(cfg: ExperimentConfig, label: str, parent_run_id: str, sweep: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylab.train.job import run_training
    from raylab.tune.artifacts import ensure_view

    generated, view = None, None
    if cfg.train.ratio < 1.0:
        from raylab.pipeline.generated_input import generated_input

        view = ensure_view(cfg, parent_run_id)
        generated = generated_input(view.view_path)
    # The trial's run directory: `<sweep>-<run identity>` (raylab.runs), the view's content identity included.
    out = run_training(cfg, generated=generated, prefix=sweep, run_name=label, parent_run_id=parent_run_id,
                       callbacks=[TuneReportCallback()], tags={"raylab.sweep": sweep})
    final = {"best_epoch": float(out.best.get("epoch", -1)), **evaluate_trial(cfg, out.run.path)}
    if view is not None and view.fd is not None:
        final[FD_METRIC] = float(view.fd)  # Wang et al. 2023 Table 7's FD column, measured on scorer features
    robust = next((v for k, v in final.items() if k.startswith("eval_aa_") and "_after_" not in k),
                  final.get(f"eval_pgd{cfg.eval.pgd_steps}_acc", math.nan))
    final.update(ledger(view.device_s if view else 0.0, view.rows if view else 0, out.device_s,
                        final.pop("eval_device_s"), robust))
    _log_trial(cfg, out, final)
    final[sweep_metric(cfg)] = final.get(sweep_metric(cfg), float(out.best.get("score", math.nan)))
    tune.report(final)


def trial_label(cfg: ExperimentConfig, keys: Sequence[str]) -> str:
    """The trial's MLflow run name: its swept values, e.g. `steps=8` or `beta=2.0,ratio=0.5` (resolved values)."""
    flat = to_flat(cfg)
    return ",".join(f"{key.rsplit('.', 1)[-1]}={_short(flat[key])}" for key in sorted(keys) if key in flat)


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, float) and math.isfinite(value) and value != int(value):
        return f"{value:g}"
    return str(value)


def sweep_metric(cfg: ExperimentConfig) -> str:
    """sweep.metric, or by default the validation PGD accuracy the worker reports (`val_pgd{k}_acc`)."""
    return cfg.sweep.metric or f"val_pgd{cfg.train.val_pgd_steps}_acc"


def evaluate_trial(cfg: ExperimentConfig, run_path: Path) -> dict[str, float]:
    """PGD + AutoAttack on the best checkpoint; clean + PGD on the last (Wang et al. 2023 Tables 4-5 best/last).
    The evaluation logs its own honestly named metrics to the trial's run (`eval_pgd{k}_acc`, `eval_aa_<version>
    _acc`, `eval_last_*`); these are the same numbers for Tune."""
    from raylab.eval.job import run_eval

    best = run_eval(run_path, {"eval.checkpoint": "best"})
    seconds = best.seconds
    if best_is_last(run_path):  # last.pt holds the same EMA weights as best.pt: the same numbers, not re-run
        last = {k.replace("eval_", "eval_last_", 1): v for k, v in best.metrics.items()
                if k.startswith(("eval_clean", "eval_pgd", "eval_num_test"))}
    else:
        last_run = run_eval(run_path, {"eval.checkpoint": "last", "eval.autoattack": "none"})
        last, seconds = last_run.metrics, seconds + last_run.seconds
    return {**{k: float(v) for k, v in {**best.metrics, **last}.items() if v is not None},
            "eval_device_s": seconds * cfg.resources.eval_actors}


def best_is_last(run_path: Path) -> bool:
    import torch

    epoch = lambda name: torch.load(run_path / name, map_location="cpu", weights_only=True)["epoch"]  # noqa: E731
    return epoch("best.pt") == epoch("last.pt")


def _log_trial(cfg: ExperimentConfig, out: Any, final: dict[str, float]) -> None:
    """What the evaluation did not log itself (FD, best/last copies), and the RobustBench model info with the
    evaluation's numbers."""
    from raylab.tracking import Tracker, resolve_tracking_uri
    from raylab.train.job import log_model_info

    if not out.mlflow_run_id:
        return
    tracker = Tracker.attach(resolve_tracking_uri(cfg.tracking), out.mlflow_run_id)
    tracker.log_metrics({k: v for k, v in final.items() if k.startswith(("fd_", "eval_last_", "cost_"))
                         and math.isfinite(v)}, step=cfg.train.epochs)
    log_model_info(out.run.path, tracker)


# ---------------------------------------------------------------------------------------------------------------
# The driver.

def _coupled_entries(space: dict[str, Sequence[Any]], coupled: Optional[Coupling]) -> dict[str, Any]:
    """Tune's conditional search space: each coupled key is resolved from the trial's swept value."""
    from ray import tune

    if coupled is None:
        return {}
    (key, values), = space.items()
    return {k: tune.sample_from(lambda spec, k=k: coupled(spec.config[key])[k]) for k in coupled(list(values)[0])}


def _search(cfg: ExperimentConfig, space: dict[str, Sequence[Any]], coupled: Optional[Coupling]) -> tuple[dict, Any]:
    """(param_space entries, scheduler) for sweep.search: grid (default), random, asha."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if cfg.sweep.search == "grid":
        return {**{k: tune.grid_search(list(v)) for k, v in space.items()}, **_coupled_entries(space, coupled)}, None
    entries = {**{k: tune.choice(list(v)) for k, v in space.items()}, **_coupled_entries(space, coupled)}
    if cfg.sweep.search == "random":
        return entries, None
    return entries, ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, grace_period=1,
                                  reduction_factor=2)


def _parent_run(cfg: ExperimentConfig, path: Path, name: str, space: dict) -> str:
    """The sweep's MLflow parent run, created once in the driver (a restored sweep keeps it)."""
    from raylab.tracking import Tracker, ensure_experiment

    ensure_experiment(cfg.tracking)  # in the driver, with an explicit artifact location (ray_mlflow.md §3)
    id_file = path / PARENT_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    tracker = Tracker.start(cfg.tracking, f"sweep:{name}", params=to_flat(cfg), config_json=to_json(cfg),
                            tags={"raylab.stage": "sweep", "raylab.sweep": name, "raylab.sweep_keys": ",".join(space)})
    tracker.log_dict({k: list(v) for k, v in space.items()}, "sweep_space.json")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(id_file, tracker.run_id)
    return tracker.run_id


def _tuner(cfg: ExperimentConfig, space: dict, name: str, storage: Path, parent: str, coupled: Optional[Coupling],
           verbose: bool = False):
    """The Tuner, restored when Tune saved a state for this sweep. Tune's status and result tables (a 20-row table
    per trial, the status table every 30 s) only with `verbose`: each trial prints its own stage lines."""
    from ray import tune

    from raylab.preempt import stop_file

    trainable = tune.with_resources(tune.with_parameters(run_trial, flat=to_flat(cfg), parent_run_id=parent, sweep=name,
                                                         swept=list(space), stop_file=str(stop_file() or "") or None),
                                  {"CPU": 0, "trial_driver": 1})
    if tune.Tuner.can_restore(str(storage / name)):
        return tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    entries, scheduler = _search(cfg, space, coupled)
    param_space = entries
    tune_config = tune.TuneConfig(metric=cfg.sweep.metric, mode=cfg.sweep.mode, scheduler=scheduler,
                                  num_samples=cfg.sweep.num_samples, max_concurrent_trials=cfg.sweep.max_concurrent)
    run_config = tune.RunConfig(name=name, storage_path=str(storage), verbose=None if verbose else 0,
                                failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def run_sweep(cfg: ExperimentConfig, space: dict[str, Sequence[Any]], *, layout: str | None = None,
              coupled: Optional[Coupling] = None, verbose: bool = False) -> SweepOutcome:
    """Run (or restore and finish) the sweep of `space` over `cfg`; print and log its table and figures.
    `coupled`: keys that follow the value of a one-key sweep (`Coupling`); `verbose`: Tune's tables too."""
    from raylab.cluster import init_ray
    from raylab.preempt import Preempted, stop_line, stop_requested
    from raylab.tune.report import report_sweep

    arms = check_space(cfg, space, coupled)
    check_inputs([pin_paths(arm) for arm in arms])
    cfg = pin_paths(cfg)  # trials run in Tune's trial directories, not in this cwd
    path = sweep_dir(cfg, space, coupled)
    name, storage = path.name, path.parent
    init_ray(shared_root=cfg.tracking.root)  # every node must see the run root, before any compute
    parent = _parent_run(cfg, path, name, space)
    with _parent_status(cfg, parent) as status:
        with _tune_output(verbose):
            results = _tuner(cfg, space, name, storage, parent, coupled, verbose).fit()
        unfinished = _unfinished(path)  # Tune caught Ctrl-C, saved its state and returned as if done
        stopped = stop_requested()  # stopped trials ended ERROR: a restored sweep resumes them (resume_errored)
        end = "KILLED" if unfinished or stopped else "FAILED" if results.errors else "FINISHED"
        # the report of the trials that finished, saying how the sweep ends (the parent run ends right after it)
        rows, table = report_sweep(cfg.tracking, parent, list(space), layout=layout, status=end)
        status["end"] = end
        if stopped:
            raise Preempted(stop_line(f"sweep {name}: {len(results.errors)} trial(s) unfinished, Tune state kept"))
        if unfinished:
            raise SweepInterrupted(f"sweep {name}: interrupted with {unfinished} trial(s) unfinished; Tune state "
                                   f"kept in {path}")
        if results.errors:  # a failed trial fails the sweep
            raise SweepError(f"sweep {name}: {len(results.errors)} of {len(results)} trials failed; first error: "
                             f"{str(results.errors[0]).strip().splitlines()[-1]}")
    return SweepOutcome(name, path, parent, rows, table)


@contextlib.contextmanager
def _tune_output(verbose: bool):
    """Tune's own terminal output while the block runs: all of it with `verbose`; else none. At verbose=0 Tune's
    newer output engine still prints an experiment table and a TensorBoard hint (13 lines); its older reporter,
    which Tune picks when RAY_AIR_NEW_OUTPUT=0 as `fit()` starts, prints nothing. Errors are logged either way."""
    old = os.environ.get(NEW_OUTPUT)
    if not verbose:
        os.environ[NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(NEW_OUTPUT, None)
        else:
            os.environ[NEW_OUTPUT] = old


def _unfinished(path: Path) -> int:
    """Trials the saved experiment state still has to run. After Ctrl-C, Tune's `fit()` returns normally and its
    result grid shows the stopped trials TERMINATED; the state it saved for `Tuner.restore` keeps them PENDING."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(path)).trials)


@contextlib.contextmanager
def _parent_status(cfg: ExperimentConfig, parent: str):
    """End the sweep's parent run honestly: FINISHED, FAILED (a trial or the driver failed) or KILLED (Ctrl-C,
    also when Tune caught it). A restored sweep reopens the run first. Trial runs Tune stopped mid-way (their actor
    killed, no Python left to end them) end KILLED with it; a restored trial reopens its own run."""
    from raylab.tracking import Tracker, child_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    tracker = Tracker.resume(uri, parent)
    status: dict[str, str] = {}
    try:
        yield status
    except BaseException as exc:
        tracker.end(status.get("end") or ("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"))
        for run in child_runs(uri, parent):
            if run.status == "RUNNING":
                Tracker.attach(uri, run.run_id).end("KILLED")
        raise
    tracker.end("FINISHED")
