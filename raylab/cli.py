"""`raylab <verb>`: a thin command line over the stage rooms.

Verbs register themselves with `@verb("data verify", ...)`; each one parses its own arguments and calls one function
of a room. Every verb that builds a config accepts `--preset` and `--set key=value` (the flat config keys) and
validates the whole config before any compute starts.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from raylab.cluster import terminal
from raylab.config import ExperimentConfig, all_keys, from_json, override, parse_assignments, pin_paths, to_flat
from raylab.knobs import ConfigError, bad_input
from raylab.preempt import PREEMPTED_EXIT, Preempted
from raylab.presets import PRESETS, explain, make_config, miniature
from raylab.rehearse.run import add_args as _rehearse_args
from raylab.slurm import add_args as _slurm_args

VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {}
# Verbs that run on Ray: their terminal shows raylab's lines and every error, Ray's chatter only with --verbose.
RAY_VERBS = ("train", "scorer train", "edm train", "generate", "eval", "sweep", "data mix-stats")


def verb(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a CLI verb (possibly two words, e.g. "data verify")."""
    def wrap(fn: Callable[[argparse.Namespace], int]):
        VERBS[name] = (fn, args, help)
        return fn
    return wrap


def config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="tiny (2 CPU cores), smoke (CI) or paper (Wang et al. 2023 recipe)")
    parser.add_argument("--miniature", action="store_true", help="with --preset paper: every paper knob, only the "
                        "sizes shrunk (raylab.presets.MINIATURE), for a dress rehearsal on CPUs")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="start from a run's config.json instead of a preset (--set applies on top)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a flat config key, e.g. --set train.lr=0.2 --set attack.eps=8/255")


def config_from(ns: argparse.Namespace) -> ExperimentConfig:
    overrides = parse_assignments(ns.overrides)
    if getattr(ns, "config", None):
        path = Path(ns.config)
        if not path.is_file():
            raise ConfigError(f"--config: {path} is not a file (a run directory's config.json)")
        try:
            cfg = override(from_json(path.read_text()), overrides)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
            raise ConfigError(f"--config: {path} is not a raylab config.json ({type(err).__name__}: {err})") from None
        return pin_paths(cfg)
    cfg = make_config(ns.preset, overrides)
    if getattr(ns, "miniature", False):
        if ns.preset != "paper":
            raise ConfigError(f"--miniature: shrinks the paper preset, not {ns.preset!r} (use --preset paper)")
        cfg = miniature(cfg, overrides)
    return pin_paths(cfg)  # Ray workers have their own cwd


# ---------------------------------------------------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--explain", metavar="KEY", default=None,
                   help="show KEY's documentation, type, default and allowed range ('all' for every key)")


@verb("config", "print the resolved flat config (validates it; a dry run for every stage)", _config_args)
def _config(ns: argparse.Namespace) -> int:
    if ns.explain:
        print("\n".join(explain(k) for k in (all_keys() if ns.explain == "all" else [ns.explain])))
        return 0
    for key, value in to_flat(config_from(ns)).items():
        print(f"{key}={value}")
    return 0


@verb("data verify", "check every shard of a generated set against its manifest",
      lambda p: p.add_argument("dir"))
def _data_verify(ns: argparse.Namespace) -> int:
    from raylab.data.shard_verify import verify_store

    problems = verify_store(ns.dir)
    for line in problems:
        print(line)
    print(f"{ns.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("npz", nargs="+", help="the set's .npz part(s), in order (a 50M set: its 4 parts)")
    p.add_argument("out_dir", help="the store: one for all parts")
    p.add_argument("--shard-size", type=int, default=10_000)
    config_args(p)  # data.dataset: its classes are the labels allowed


@verb("data import-npz", "convert a reference-format .npz set (image, label; one file or its parts) into one store "
      "of Parquet shards (labels: classes of data.dataset; resumable)", _import_args)
def _data_import(ns: argparse.Namespace) -> int:
    import time

    from raylab.data.datasets import get_dataset
    from raylab.data.npz_import import import_npz

    classes = get_dataset(config_from(ns).data.dataset).num_classes
    start = time.perf_counter()
    store = import_npz(ns.npz, ns.out_dir, shard_size=ns.shard_size, num_classes=classes)
    manifest = store.manifest
    rows = sum(e["rows"] for e in manifest["shards"].values())
    print(f"{ns.out_dir}: {rows} rows from {len(ns.npz)} part(s) in {len(manifest['shards'])} shards, identity "
          f"{store.identity_hash[:12]} ({time.perf_counter() - start:.0f} s)")
    return 0


def _mix_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="generated shard store or selection view")
    p.add_argument("--batches", type=int, default=60, help="global batches to read (default 60)")
    config_args(p)


@verb("data mix-stats", "class mix of the generated part of training batches, read through the training ingest "
      "(train.batch_size, train.ratio, resources.num_workers)", _mix_stats_args)
def _data_mix_stats(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.data.mix import mix_stats
    from raylab.train.ingest import generated_label_batches

    cfg = config_from(ns)
    if ns.batches < 1:
        raise ValueError(f"--batches: {ns.batches} must be >= 1")
    index = _generated_input(ns.target)  # a bad store or view stops here, before Ray starts
    init_ray(shared_root=cfg.tracking.root)
    stats = mix_stats(generated_label_batches(index, cfg, ns.batches), index)
    for line in _mix_lines(ns.target, cfg, index, stats):
        print(line)
    return 0


def _mix_lines(target: str, cfg: ExperimentConfig, index, stats) -> list[str]:
    import numpy as np

    world = max(cfg.resources.num_workers, 1)
    present = (stats.counts > 0).sum(1)
    p = stats.p_values()
    shards = len(np.unique(index.blocks["file"]))
    return [f"{target}: {len(index)} rows in {shards} shards, {int((stats.expected > 0).sum())} classes",
            f"{len(stats.counts)} batches of {int(stats.counts[0].sum())} generated rows ({world} worker(s); "
            f"train.batch_size={cfg.train.batch_size}, train.ratio={cfg.train.ratio}, train.seed={cfg.train.seed})",
            f"classes per batch: mean {present.mean():.1f}, fewest {present.min()}",
            f"max class share per batch: median {np.median(stats.max_share):.1%}, "
            f"90th percentile {np.quantile(stats.max_share, 0.9):.1%}",
            f"chi-square against the view's class mix: median p {np.median(p):.3g}, "
            f"{int((p < 1e-3).sum())} of {len(p)} batches below p = 0.001",
            stats.summary()]


def _print_training(out) -> None:
    best, last = out.best, out.last
    print(f"run dir: {out.run.path}")
    print(f"checkpoints: {out.run.path / 'best.pt'} (epoch {best.get('epoch')}), {out.run.path / 'last.pt'}")
    print("last epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
    print(f"MLflow run: {out.mlflow_run_id} (see `raylab ui`)")


def _train_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--generated", default=None, help="generated view or shard store (needed when train.ratio < 1)")


@verb("train", "adversarial training on Ray Train (TRADES by default)", _train_args)
def _train(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.pipeline.generated_input import generated_input
    from raylab.train.job import run_training

    cfg = config_from(ns)
    # A bad view or store stops here, before Ray starts; its content identity is part of the run's identity.
    generated = generated_input(ns.generated) if ns.generated else None
    init_ray(shared_root=cfg.tracking.root)
    _print_training(run_training(cfg, generated=generated))
    return 0


def _generated_input(path: str | None):
    """The rows of a selected view or a whole shard store; None without one."""
    if path is None:
        return None
    from raylab.pipeline.generated_input import open_generated

    return open_generated(path)


@verb("scorer train", "train the standard classifier that scores generated images", config_args)
def _scorer_train(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.train.job import run_scorer_training

    cfg = config_from(ns)
    init_ray(shared_root=cfg.tracking.root)
    _print_training(run_scorer_training(cfg))
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--key", required=True, help="flat config key to sweep, e.g. train.beta")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 2,5,8")
    p.add_argument("--layout", default=None, help="table layout: steps, best_last, plain")


@verb("sweep", "a Ray Tune sweep over one config key (each trial: generate, select, train, evaluate)", _sweep_args)
def _sweep(ns: argparse.Namespace) -> int:
    from raylab.tune.sweep import SweepError, run_sweep

    try:
        run_sweep(config_from(ns), {ns.key: [v.strip() for v in ns.values.split(",")]}, layout=ns.layout,
                  verbose=ns.verbose)
    except SweepError as err:  # some trials failed: the report of the others is printed and logged; exit non-zero
        print(f"raylab sweep: {err}", file=sys.stderr)
        return 1
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key and its values (repeat for a grid)")


@verb("plan", "a dry run: images, shards, bytes, steps and device-hours per stage, before spending", _plan_args)
def _plan(ns: argparse.Namespace) -> int:
    from raylab.cost import make_plan

    space = {k: [v.strip() for v in vs.split(",")] for k, vs in parse_assignments(ns.sweep).items()}
    for line in make_plan(config_from(ns), space).lines():
        print(line)
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("sweep", help="sweep name (as printed by the sweep, or its prefix before the hash)")
    p.add_argument("--layout", default=None)


@verb("report", "rebuild a sweep's table and figures from MLflow alone", _report_args)
def _report(ns: argparse.Namespace) -> int:
    from raylab.tune.report import report_by_name

    _, _, out = report_by_name(config_from(ns).tracking, ns.sweep, layout=ns.layout)
    print(f"report: {out / 'report.md'} (its figures in figures/ beside it; also the sweep's MLflow parent run's)")
    return 0


def _runs_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--sweeps", action="store_true", help="list sweeps (the names `raylab report` takes)")
    p.add_argument("--limit", type=int, default=20, help="most recent N (default 20)")


@verb("runs", "list recent runs (or sweeps) with their key metrics, from MLflow", _runs_args)
def _runs(ns: argparse.Namespace) -> int:
    from raylab.tracking.listing import list_runs

    for line in list_runs(config_from(ns).tracking, sweeps=ns.sweeps, limit=ns.limit):
        print(line)
    return 0


def _ui_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--port", type=int, default=None, help="default tracking.ui_port; 0 = any free port")
    p.add_argument("--sweep", default=None, help="the sweep to open on (as `raylab report` takes it; default: newest)")


@verb("ui", "serve the MLflow UI on 127.0.0.1 for the run root's store", _ui_args)
def _ui(ns: argparse.Namespace) -> int:
    from raylab.tracking.ui import serve_ui

    cfg = config_from(ns)
    serve_ui(cfg.tracking, port=ns.port, block=True, sweep=ns.sweep)  # port None = tracking.ui_port; 0 = any free
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--out", default=None, help="shard store directory (default: the run dir's shards/)")


@verb("generate", "sample a generated set on Ray Data: sampler and scorer actors -> Parquet shards (resumable)",
      _generate_args)
def _generate(ns: argparse.Namespace) -> int:
    from raylab.pipeline.generate_job import run_generate

    run_generate(config_from(ns), ns.out)  # checks everything, then starts Ray; prints a one-line summary
    return 0


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("view_out", help="directory the view is written to")
    p.add_argument("--store", required=True, help="generated shard store to select from")
    config_args(p)


def _print_json(data: dict) -> None:
    import json

    print(json.dumps(data, indent=1))


@verb("select", "select rows of a generated set into a view (select.policy, select.amount); copies no image",
      _select_args)
def _select(ns: argparse.Namespace) -> int:
    from raylab.pipeline.select import build_view, describe
    from raylab.pipeline.scoring import second_scores

    cfg = config_from(ns)
    second = second_scores(cfg, ns.store)  # the agreement policy's second scorer, cached beside the shards
    _print_json(describe(build_view(ns.store, cfg.select, ns.view_out, second=second)))
    return 0


@verb("data describe", "rows per class and score quantiles of a selection view", lambda p: p.add_argument("view"))
def _data_describe(ns: argparse.Namespace) -> int:
    from raylab.pipeline.select import describe, load_view

    _print_json(describe(load_view(ns.view)))
    return 0


@verb("edm train", "train the EDM generator on Ray Train (edm.*, resumable: rerun the same config)", config_args)
def _edm_train(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.train.edm_worker import check_inputs, train_edm

    cfg = config_from(ns)
    check_inputs(cfg)  # before Ray starts
    init_ray(shared_root=cfg.tracking.root)
    out = train_edm(cfg)
    print(f"run: {out.run_dir}\nnetwork: {out.network_dir}\nfinal loss: {out.final_loss:.4f} "
          f"after {out.history[-1]['kimg'] if out.history else 0:g} kimg\nMLflow run: {out.mlflow_run_id}")
    return 0


def _edm_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num", type=int, default=100, help="images in all, spread evenly over the classes")
    p.add_argument("--steps", type=int, default=20, help="EDM Heun steps (NFE = 2*steps - 1)")
    p.add_argument("--out", required=True, help="directory for samples.png (one class per row) and samples.npz")
    p.add_argument("--checkpoint", default="", help="network dir or official .pkl; '' = committed digits EDM")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: image i of class c is seeded by (seed, c, i)")
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: all)")


@verb("edm sample", "sample a few images locally (no Ray) into a PNG grid and an .npz", _edm_sample_args)
def _edm_sample(ns: argparse.Namespace) -> int:
    from raylab.generate.sample_local import sample_to_dir

    classes = [int(c) for c in ns.classes.split(",") if c.strip()] if ns.classes else None
    out = sample_to_dir(ns.checkpoint, ns.num, ns.steps, ns.out, seed=ns.seed, class_labels=classes)
    print(f"{len(out.labels)} images: {out.grid}, {out.npz}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    config_args(p)  # for a run directory --preset is ignored and only eval.*/resources.*/tracking.* may be --set
    p.add_argument("target", help="training run directory (eval.checkpoint picks best.pt/last.pt), or a checkpoint "
                                  "file (RobustBench format: --set model.name=... --set data.dataset=...)")
    p.add_argument("--out", default=None, help="parent of the <fingerprint>/ result directory "
                                               "(default: <run or checkpoint dir>/eval)")
    p.add_argument("--checks", action="store_true",
                   help="gradient-masking checks (Rebuffi et al. 2021 App. C) on chunk 0")
    p.add_argument("--local", action="store_true", help="evaluate in this process instead of Ray Data actors")


@verb("eval", "clean / PGD / AutoAttack evaluation, sharded over Ray Data actors and resumable per chunk",
      _eval_args)
def _eval(ns: argparse.Namespace) -> int:
    from raylab.eval.job import run_eval  # starts Ray itself (raylab.cluster.init_ray) after validating the input

    run_eval(ns.target, parse_assignments(ns.overrides), ns.out, preset=ns.preset, checks=ns.checks,
             engine="local" if ns.local else "ray")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--robustbench", nargs=2, metavar=("RUN", "OUT"), required=True,
                   help="training run directory and the .pt file to write (DMWideResNet layout)")
    p.add_argument("--which", choices=("best", "last"), default="best")
    p.add_argument("--normalization-buffers", action="store_true",
                   help="keep mean/std inside the state_dict (RobustBench's DMWideResNet has none there)")


@verb("export", "export a run's EMA weights as a RobustBench DMWideResNet checkpoint", _export_args)
def _export(ns: argparse.Namespace) -> int:
    from raylab.eval.export import export_robustbench

    from raylab.eval.export import write_model_info

    run, out = ns.robustbench
    path = export_robustbench(run, out, ns.which, normalization_buffers=ns.normalization_buffers)
    info = write_model_info(run, Path(path).with_suffix(".json"), ns.which)
    print(f"{path}: RobustBench DMWideResNet checkpoint ({ns.which} of {run}); model info {info}; evaluate it with "
          f"`raylab eval {path} --set model.name=... --set data.dataset=...`")
    return 0


@verb("rehearse", "a real multi-node Ray cluster on this machine (root): run a job, lose a node, check the "
      "cluster contract", _rehearse_args)
def _rehearse(ns: argparse.Namespace) -> int:
    from raylab.rehearse.run import options_from, rehearse
    from raylab.rehearse.slurm import rehearse_slurm

    opts = options_from(vars(ns))
    return rehearse_slurm(opts) if opts.slurm else rehearse(opts)


@verb("slurm", "write the sbatch script of a command on Slurm nodes (exclusive or shared), requeued after SIGTERM "
      "until done", _slurm_args)
def _slurm(ns: argparse.Namespace) -> int:
    from raylab.slurm import main_from

    return main_from(vars(ns))


# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylab", description=__doc__.splitlines()[0])
    groups: dict[str, argparse._SubParsersAction] = {"": parser.add_subparsers(dest="verb", required=True)}
    for name, (fn, add_args, help_text) in VERBS.items():
        *prefix, last = name.split()
        subs = groups[""]
        for word in prefix:  # two-word verbs live under a group parser ("data", "edm", ...)
            if word not in groups:
                groups[word] = subs.add_parser(word, help=f"{word} commands").add_subparsers(dest="sub", required=True)
            subs = groups[word]
        sub = subs.add_parser(last, help=help_text, description=help_text)
        add_args(sub)
        if name in RAY_VERBS:
            sub.add_argument("--verbose", action="store_true", help="also Ray's own output (Ray Train's and Ray "
                             "Data's INFO lines; Tune's tables for a sweep)")
        sub.set_defaults(func=fn)
    return parser


# What Ctrl-C leaves behind, per verb; rerunning the same command resumes every one of them.
KEPT = {"train": "checkpoints of the finished epochs in the run directory",
        "scorer train": "checkpoints of the finished epochs in the run directory",
        "edm train": "the latest checkpoint in the run directory",
        "generate": "every shard already renamed into the store", "sweep": "Tune's state and every finished trial",
        "eval": "every finished chunk", "select": "nothing half-written (views appear atomically)"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    try:
        with terminal(getattr(ns, "verbose", True)):
            return ns.func(ns)
    except Preempted as err:  # checkpointed on SIGTERM: the sbatch script requeues on this status
        print(f"raylab: {err}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        name = " ".join(w for w in (ns.verb, getattr(ns, "sub", None)) if w)
        print(f"raylab {name}: interrupted; kept: {KEPT.get(name, 'what was finished')}; resume with: raylab "
              f"{' '.join(map(shlex.quote, argv))}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - bad input is one line; anything else keeps its traceback
        cause = bad_input(err)
        if cause is None:
            raise
        print(f"raylab: error: {' '.join(str(cause).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
