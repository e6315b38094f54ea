"""`raylab <verb>`: a thin command line over the stage rooms.

Verbs register themselves with `@verb("data verify", ...)`; each one parses its own arguments and calls one function
of a room. Every verb that builds a config accepts `--preset` and `--set key=value` (the flat config keys) and
validates the whole config before any compute starts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from raylab.config import ConfigError, ExperimentConfig, make_config, parse_assignments, to_flat

VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {}


def verb(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a CLI verb (possibly two words, e.g. "data verify")."""
    def wrap(fn: Callable[[argparse.Namespace], int]):
        VERBS[name] = (fn, args, help)
        return fn
    return wrap


def config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny (2 CPU cores) or paper (000_... recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a flat config key, e.g. --set train.lr=0.2 --set attack.eps=8/255")


def config_from(ns: argparse.Namespace) -> ExperimentConfig:
    return make_config(ns.preset, parse_assignments(ns.overrides))


# ---------------------------------------------------------------------------------------------------------------

@verb("config", "print the resolved flat config (validates it; a dry run for every stage)", config_args)
def _config(ns: argparse.Namespace) -> int:
    for key, value in to_flat(config_from(ns)).items():
        print(f"{key}={value}")
    return 0


@verb("data verify", "check every shard of a generated set against its manifest",
      lambda p: p.add_argument("dir"))
def _data_verify(ns: argparse.Namespace) -> int:
    from raylab.data.shards import verify_store

    problems = verify_store(ns.dir)
    for line in problems:
        print(line)
    print(f"{ns.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("npz")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=10_000)


@verb("data import-npz", "convert a reference-format .npz (image, label) into Parquet shards", _import_args)
def _data_import(ns: argparse.Namespace) -> int:
    from raylab.data.npz_import import import_npz

    store = import_npz(ns.npz, ns.out_dir, shard_size=ns.shard_size)
    print(f"{ns.out_dir}: {len(store.manifest['shards'])} shards, identity {store.identity_hash[:12]}")
    return 0


def _print_training(out) -> None:
    best, last = out.best, out.last
    print(f"run dir: {out.run.path}")
    print(f"checkpoints: {out.run.path / 'best.pt'} (epoch {best.get('epoch')}), {out.run.path / 'last.pt'}")
    print(f"last epoch: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
    print(f"MLflow run: {out.mlflow_run_id} (see `raylab ui`)")


def _train_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--generated", default=None, help="generated view or shard store (needed when train.ratio < 1)")


@verb("train", "adversarial training on Ray Train (TRADES by default)", _train_args)
def _train(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.train.job import run_training

    cfg = config_from(ns)
    init_ray()
    generated, rows = _generated_input(ns.generated)
    _print_training(run_training(cfg, generated=generated, generated_rows=rows))
    return 0


def _generated_input(path: str | None):
    """(Ray Dataset, rows) of a shard store directory; (None, 0) without one."""
    if path is None:
        return None, 0
    from raylab.data.shards import load_manifest, read_dataset

    rows = sum(e["rows"] for e in load_manifest(path)["shards"].values())
    return read_dataset(path), rows


@verb("scorer train", "train the standard classifier that scores generated images", config_args)
def _scorer_train(ns: argparse.Namespace) -> int:
    from raylab.cluster import init_ray
    from raylab.train.job import run_scorer_training

    cfg = config_from(ns)
    init_ray()
    _print_training(run_scorer_training(cfg))
    return 0


def _ui_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--port", type=int, default=None)


@verb("ui", "serve the MLflow UI on 127.0.0.1 for the run root's store", _ui_args)
def _ui(ns: argparse.Namespace) -> int:
    from raylab.tracking.ui import serve_ui

    cfg = config_from(ns)
    serve_ui(cfg.tracking, port=ns.port or cfg.tracking.ui_port, block=True)
    return 0


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
        sub.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        # Bad input: one line, no traceback, non-zero exit (the error classes carry the key/file).
        print(f"raylab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
