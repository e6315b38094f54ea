"""Sharded, resumable evaluation on Ray Data: clean, PGD-k and AutoAttack (and certification) per fixed chunk.

    work items (one row per *missing* chunk id, plus CHECKS_ITEM when the gradient-masking checks are asked for)
      └─ map_batches(EvalActor, ActorPoolStrategy(size=resources.eval_actors), batch_size=1)
           each actor loads the model once (eval mode, in-model normalization); one call = one chunk:
           clean flags, PGD-k flags (margin loss, CPU generator seeded by (eval.seed, chunk id)),
           AutoAttack `fell_at` (run_autoattack, seed=eval.seed, its per-attack state kept beside the chunk),
           certification (generator seeded by (eval.seed, chunk id, 1)) → <out>/chunk-XXXX.json, atomically
    driver: reads the chunk files in order and concatenates per-example outcomes (AutoAttack via `aggregate`)

The test set (its first eval.num_test images) is cut into fixed chunks of eval.chunk_size, and every random
stream is a function of (eval.seed, chunk id) alone, so the numbers do not depend on the number of actors, on
which actor ran a chunk, or on retries: they equal one process running the same chunks (`engine="local"`).
An interrupted evaluation resumes with the missing chunks only (a chunk file is valid when its range and labels
match). Results live in `<run dir>/eval/<fingerprint>/` where the fingerprint is the evaluation's run identity
(`raylab.runs`): the weights' sha256, the model, the dataset and every eval setting except num_test (so a larger
num_test reuses the chunks it shares), so retrained weights are a new evaluation and unchanged ones resume.
Actors write into that directory: on a multi-node cluster it must be on a filesystem every node sees, as must
the checkpoint.

What one chunk computes (measures, seeds, checks) lives in `raylab.eval.chunk`; this module persists, shards
and reports it. `run_eval` evaluates a training run directory (its config.json and the EMA weights in best.pt /
last.pt) or a checkpoint file (RobustBench format; the config names model and dataset, see raylab.eval.export),
prints a labelled table and logs it to the run's MLflow run when the directory has `mlflow_run_id`. `evaluate` is
the layer below: any picklable model source, any uint8 images.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from raylab.cluster import RootToken, check_this_node
from raylab.config import EvalConfig, ExperimentConfig, ResourcesConfig, from_json, override
from raylab.knobs import ConfigError
from raylab.presets import make_config
from raylab.data.datasets import check_dataset, get_dataset
from raylab.eval.autoattack import AAResult, aa_norm, aggregate, resolve_attacks
from raylab.eval.checks import CheckReport
from raylab.eval.chunk import (ChunkJob, aa_attacks, aa_budget, evaluate_chunk, plan_chunks, resolve_checks,
                               run_checks, to_float)
from raylab.eval.export import load_checkpoint_model, read_state_dict
from raylab.eval.metrics import EvalError, require_eval_mode
from raylab.eval.report import EvalHeader, EvalResult, format_table, metric_prefix
from raylab.io import atomic_write_json, sha256_file
from raylab.precision import BF16Logits, precision_params
from raylab.runs import run_identity, write_config
from raylab.runtime import gpu_backends

FORMAT = "raylab-eval/1"     # part of the fingerprint: bump when a chunk's meaning changes
CHECKS_ITEM = -1             # the work item that runs the gradient-masking checks
MLFLOW_RUN_FILE = "mlflow_run_id"  # written by raylab.train.job (not imported: it pulls in Ray Train)
# A run directory fixes what was trained; only these sections/keys may be overridden when evaluating it.
RUN_OVERRIDABLE = ("eval.", "resources.", "tracking.", "data.root", "data.download")


# ---------------------------------------------------------------------------------------------------------------
# What is evaluated: a picklable recipe that builds the model where it runs (once per actor).

class ModelSource(Protocol):
    def load(self, device: torch.device) -> nn.Module: ...


@dataclass(frozen=True)
class CheckpointSource:
    """A registered architecture with a checkpoint file's weights (raylab run checkpoint or RobustBench format)."""
    path: str
    model: str
    activation: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def load(self, device: torch.device) -> nn.Module:
        return load_checkpoint_model(self.path, self.model, num_classes=self.num_classes, mean=self.mean,
                                     std=self.std, activation=self.activation).to(device).eval()


@dataclass(frozen=True)
class EvalSpec:
    """Everything an actor needs besides the images."""
    source: ModelSource
    eval: EvalConfig
    out: str
    num_classes: int
    chunks: tuple[tuple[int, int], ...]
    checks: tuple[str, ...] = ()
    use_gpu: bool = False
    crash: Optional[dict] = None   # fault drill (tests): {"chunk": id, "marker": path}, see _crash_once
    root: Optional[RootToken] = None  # the token of `out` on Ray: each actor checks its node sees it as it starts


# ---------------------------------------------------------------------------------------------------------------
# Files: one JSON per chunk, written atomically; a chunk counts as done when its range and labels match.

def chunk_path(out: str | Path, chunk: int) -> Path:
    return Path(out) / f"chunk-{chunk:04d}.json"


def _state_path(spec: EvalSpec, chunk: int) -> Path:
    start, stop = spec.chunks[chunk]
    return Path(spec.out) / "state" / f"chunk-{chunk:04d}-{start}-{stop}.aa.json"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_chunk(spec: EvalSpec, chunk: int, labels: np.ndarray) -> Optional[dict]:
    """The chunk's record if it exists and belongs to these images, else None."""
    start, stop = spec.chunks[chunk]
    record = _read_json(chunk_path(spec.out, chunk))
    if record is None or (record.get("start"), record.get("stop")) != (start, stop):
        return None
    return record if record.get("labels") == labels[start:stop].tolist() else None


def _checks_done(spec: EvalSpec) -> bool:
    record = _read_json(Path(spec.out) / "checks.json")
    return record is not None and [c["name"] for c in record["checks"]] == list(spec.checks)


def missing_items(spec: EvalSpec, labels: np.ndarray) -> list[int]:
    todo = [i for i in range(len(spec.chunks)) if read_chunk(spec, i, labels) is None]
    return todo + ([CHECKS_ITEM] if spec.checks and not _checks_done(spec) else [])


# ---------------------------------------------------------------------------------------------------------------
# The worker: an actor of the pool (Ray) or an object in this process (engine="local").

def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _crash_once(crash: Optional[dict], item: int) -> None:
    """Fault drill: the first worker to reach chunk crash["chunk"] creates the marker and kills its process."""
    if not crash or crash["chunk"] != item:
        return
    try:
        os.close(os.open(crash["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class EvalActor:
    """Holds the model and the images; each call evaluates the work items of its batch (batch_size=1)."""

    def __init__(self, spec: EvalSpec, images: np.ndarray, labels: np.ndarray):
        check_this_node(spec.root)
        self.spec, self.images, self.labels = spec, images, labels
        model = spec.source.load(_device(spec.use_gpu))
        require_eval_mode(model)
        self.model = BF16Logits(model).eval() if spec.eval.bf16 else model  # raylab.precision: fp32 by default

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [int(i) for i in batch["item"]]
        return {"item": np.array(items, np.int64), "computed": np.array([self.run(i) for i in items], bool)}

    def run(self, item: int) -> bool:
        """Evaluate one work item and persist it; False when a valid result was already there (a retry)."""
        _crash_once(self.spec.crash, item)
        with gpu_backends(self.spec.eval.tf32):
            return self._checks() if item == CHECKS_ITEM else self._chunk(item)

    def _tensors(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[start:stop]), torch.from_numpy(self.labels[start:stop].astype(np.int64))

    def _chunk(self, chunk: int) -> bool:
        if read_chunk(self.spec, chunk, self.labels) is not None:
            return False
        start, stop = self.spec.chunks[chunk]
        x, y = self._tensors(start, stop)
        state = _state_path(self.spec, chunk)
        began, cpu = time.perf_counter(), time.process_time()
        record = evaluate_chunk(self.model, x, y, ChunkJob(chunk, self.spec.eval, self.spec.num_classes, state))
        record.update(chunk=chunk, start=start, stop=stop, labels=y.tolist(), seconds=time.perf_counter() - began,
                      cpu_seconds=time.process_time() - cpu, pid=os.getpid())
        atomic_write_json(chunk_path(self.spec.out, chunk), record)
        state.unlink(missing_ok=True)
        return True

    def _checks(self) -> bool:
        x, y = self._tensors(*self.spec.chunks[0])
        reports = run_checks(self.model, x, y, self.spec.checks, self.spec.eval)
        atomic_write_json(Path(self.spec.out) / "checks.json", {"checks": [r.to_json() for r in reports]})
        return True


# ---------------------------------------------------------------------------------------------------------------
# Engines: (spec, images, labels, work items, resources) -> number of chunks computed.

Engine = Callable[[EvalSpec, np.ndarray, np.ndarray, list[int], ResourcesConfig], int]
ENGINES: dict[str, Engine] = {}


def register_engine(name: str) -> Callable[[Engine], Engine]:
    def decorate(fn: Engine) -> Engine:
        ENGINES[name] = fn
        return fn
    return decorate


@register_engine("local")
def _run_local(spec: EvalSpec, images: np.ndarray, labels: np.ndarray, todo: list[int],
               res: ResourcesConfig) -> int:
    """The same worker in this process, items in order: the single-process reference."""
    worker = EvalActor(spec, images, labels)
    done = [worker.run(i) for i in todo]
    return sum(d for i, d in zip(todo, done) if i != CHECKS_ITEM)


@register_engine("ray")
def _run_ray(spec: EvalSpec, images: np.ndarray, labels: np.ndarray, todo: list[int],
             res: ResourcesConfig) -> int:
    """Ray Data: the work items through an actor pool, one item per call and in flight per actor (items are
    long: balance beats hiding dispatch latency)."""
    import ray.data

    from raylab.cluster import init_ray, root_token

    init_ray()  # no-op when connected; a local Ray gets >= 4 logical CPUs (actor pools deadlock at 2)
    spec = dataclasses.replace(spec, root=root_token(spec.out))  # the actors write there, on whichever node
    ds = ray.data.from_items([{"item": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        EvalActor, fn_constructor_kwargs={"spec": spec, "images": images, "labels": labels}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(res.eval_actors, len(todo)), max_tasks_in_flight_per_actor=1),
        # A lost actor is restarted and its item retried by Ray Data's defaults (unlimited restarts and retries).
        num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None)
    rows = ds.take_all()
    return sum(bool(r["computed"]) for r in rows if int(r["item"]) != CHECKS_ITEM)


# ---------------------------------------------------------------------------------------------------------------
# The sharded evaluation of any model source.

@dataclass(frozen=True)
class EvalOutcome:
    result: EvalResult
    out_dir: Path
    chunks_total: int
    chunks_computed: int
    seconds: float
    table: str = ""
    mlflow_run_id: Optional[str] = None

    @property
    def clean_acc(self) -> float:
        return self.result.clean_acc

    @property
    def pgd_acc(self) -> float:
        return self.result.pgd_acc

    @property
    def aa_acc(self) -> Optional[float]:
        return self.result.aa_acc

    @property
    def metrics(self) -> dict[str, float]:
        """The MLflow metrics: `eval_*` for the best checkpoint or a file, `eval_last_*` for last.pt."""
        return self.result.metrics(metric_prefix(self.result.header.checkpoint))


def default_header(ev: EvalConfig, **fields: Any) -> EvalHeader:
    attacks = resolve_attacks(ev.autoattack, aa_attacks(ev)) if ev.autoattack != "none" else ()
    base = dict(model="model", dataset="images", checkpoint="-", epoch=None, norm=ev.norm, eps=ev.eps,
                autoattack=ev.autoattack, attacks=attacks, pgd_steps=ev.pgd_steps, seed=ev.seed,
                chunk_size=ev.chunk_size, certify_sigma=ev.certify_sigma if ev.certify else None,
                transfer=ev.transfer, aa_budget=aa_budget(ev).label())
    return EvalHeader(**{**base, **fields})


def preflight(source: Any, images: np.ndarray, ev: EvalConfig) -> int:
    """Build the model once in the driver (CPU) and run one image: bad weights, a train-mode model or bad settings
    fail here in one line instead of in every actor. Returns the number of classes."""
    aa_norm(ev.norm)
    if ev.autoattack != "none":
        resolve_attacks(ev.autoattack, aa_attacks(ev))
    if len(images) == 0:
        raise EvalError("images: nothing to evaluate (eval.num_test selects 0 images)")
    model = source.load(torch.device("cpu"))
    require_eval_mode(model)
    with torch.no_grad():
        return int(model(to_float(images[:1])).shape[1])


def collect(spec: EvalSpec, labels: np.ndarray, header: EvalHeader) -> EvalResult:
    """Concatenate the chunk records in order into one result (exact: per-example outcomes)."""
    records = []
    for i in range(len(spec.chunks)):
        record = read_chunk(spec, i, labels)
        if record is None:
            raise EvalError(f"eval: chunk {i} is missing from {spec.out} after the run")
        records.append(record)
    flags = {k: np.concatenate([np.asarray(r[k], bool) for r in records]) for k in ("clean", "pgd")}
    aa = aggregate([AAResult.from_json(r["aa"]) for r in records]) if records[0]["aa"] is not None else None
    cert = [r["certify"] for r in records]
    preds = np.concatenate([c["preds"] for c in cert]).astype(np.int64) if cert[0] is not None else None
    radii = np.concatenate([c["radii"] for c in cert]).astype(np.float64) if cert[0] is not None else None
    checks = _read_json(Path(spec.out) / "checks.json") if spec.checks else None
    reports = tuple(CheckReport(**{**c, "xs": tuple(c["xs"]), "accs": tuple(c["accs"])})
                    for c in (checks or {}).get("checks", []))
    return EvalResult(header, labels.astype(np.int64), flags["clean"], flags["pgd"], aa, preds, radii, reports)


def evaluate(source: Any, images: np.ndarray, labels: np.ndarray, ev: EvalConfig, out: str | Path, *,
             resources: ResourcesConfig | None = None, checks: bool | Sequence[str] = (), engine: str = "ray",
             header: EvalHeader | None = None, crash: Optional[dict] = None) -> EvalOutcome:
    """Evaluate `source` (anything with `.load(device) -> nn.Module`, picklable) on uint8 NHWC `images` with int
    `labels`, in fixed chunks under `out`, computing only chunks not already there. `engine`: "ray" (actor pool of
    resources.eval_actors) or "local" (this process)."""
    if engine not in ENGINES:
        raise EvalError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    resources = resources or ResourcesConfig()
    names = resolve_checks(checks, ev)
    num_classes = preflight(source, images, ev)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, np.int64)
    spec = EvalSpec(source, ev, str(out), num_classes, plan_chunks(len(labels), ev.chunk_size), names,
                    resources.gpus_per_actor > 0, crash)
    todo = missing_items(spec, labels)
    began = time.perf_counter()
    computed = ENGINES[engine](spec, images, labels, todo, resources) if todo else 0
    result = collect(spec, labels, header or default_header(ev))
    return EvalOutcome(result, out, len(spec.chunks), computed, time.perf_counter() - began)


# ---------------------------------------------------------------------------------------------------------------
# Targets: a training run directory, one of its checkpoints, or a bare (RobustBench-format) checkpoint file.

@dataclass(frozen=True)
class Target:
    cfg: ExperimentConfig
    weights: Path
    checkpoint: str            # "best", "last", or the file's name
    run: Optional[Path]        # the training run directory, when there is one


def _run_config(run: Path, overrides: Mapping[str, Any]) -> ExperimentConfig:
    fixed = [k for k in overrides if not k.startswith(RUN_OVERRIDABLE)]
    if fixed:
        raise ConfigError(f"{fixed[0]}: fixed by {run / 'config.json'} (a run is evaluated as it was trained; "
                          "override only eval.*, resources.*, tracking.*, data.root, data.download)")
    return override(from_json((run / "config.json").read_text()), overrides)


def resolve_target(target: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                   preset: str = "paper") -> Target:
    """A run directory (weights per eval.checkpoint), its best.pt/last.pt, or a checkpoint file whose config is
    `preset` + `overrides` (these must name model.name and data.dataset)."""
    path, overrides = Path(target), dict(overrides or {})
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvalError(f"target: {path} has no config.json (not a training run directory)")
        cfg = _run_config(path, overrides)
        weights = path / f"{cfg.eval.checkpoint}.pt"
        if not weights.is_file():
            raise EvalError(f"target: {weights} is missing (eval.checkpoint={cfg.eval.checkpoint})")
        return Target(cfg, weights, cfg.eval.checkpoint, path)
    if not path.is_file():
        raise EvalError(f"target: {path} is neither a run directory nor a checkpoint file")
    if path.stem in ("best", "last") and (path.parent / "config.json").is_file():
        return Target(_run_config(path.parent, {**overrides, "eval.checkpoint": path.stem}), path, path.stem,
                      path.parent)
    return Target(make_config(preset, overrides), path, path.name, None)


def load_test_subset(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The first eval.num_test test images (uint8 NHWC) and labels of data.dataset (0 = all), read in the driver:
    the actors get them from it, so only this node needs the dataset."""
    check_dataset(cfg.data)
    _, test = get_dataset(cfg.data.dataset).load(Path(cfg.data.root), cfg.data.download)
    n = cfg.eval.num_test or len(test)
    if n > len(test):
        raise EvalError(f"eval.num_test: {n} exceeds the {len(test)} test images of {cfg.data.dataset}")
    return test.images[:n], test.labels[:n]


def eval_fingerprint(cfg: ExperimentConfig, weights_sha256: str) -> str:
    """Content address of an evaluation's chunks: its run identity (raylab.runs STAGE_KEYS/STAGE_INPUTS "eval")."""
    return run_identity(cfg, "eval", {"weights": weights_sha256, "format": FORMAT})


def result_dir(tgt: Target, weights_sha256: str, out_dir: str | os.PathLike | None = None) -> Path:
    """`<out_dir or the run dir / checkpoint dir>/eval/<fingerprint>/`, created holding the resolved config it
    evaluates with (`config.json`: run config plus the eval overrides; rewritten only when it changed)."""
    out = Path(out_dir or (tgt.run or tgt.weights.parent) / "eval") / eval_fingerprint(tgt.cfg, weights_sha256)
    write_config(out, tgt.cfg)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The front door.

def run_eval(target: str | os.PathLike, cfg_overrides: Mapping[str, Any] | None = None,
             out_dir: str | os.PathLike | None = None, *, preset: str = "paper", checks: bool | Sequence[str] = False,
             engine: str = "ray", track: bool = True, crash: Optional[dict] = None) -> EvalOutcome:
    """Evaluate a training run directory or a checkpoint file; print, save and log the labelled table.

    `cfg_overrides`: flat keys (`{"eval.num_test": 1000}`); for a run directory only eval.*, resources.*,
    tracking.*, data.root/download. `preset`: the base config of a bare checkpoint file (ignored for runs).
    `out_dir`: parent of the `<fingerprint>/` result directory (default `<run dir or checkpoint dir>/eval`).
    `checks`: True or names of raylab.eval.checks.CHECKS, run on the first chunk. `crash`: the fault drill.
    """
    tgt = resolve_target(target, cfg_overrides, preset)
    cfg = tgt.cfg
    spec = get_dataset(cfg.data.dataset)
    images, labels = load_test_subset(cfg)
    source = CheckpointSource(str(tgt.weights.resolve()), cfg.model.name, cfg.model.activation, spec.num_classes,
                              tuple(spec.mean), tuple(spec.std))
    sha = sha256_file(tgt.weights)
    out = result_dir(tgt, sha, out_dir)
    header = default_header(cfg.eval, model=cfg.model.name, dataset=cfg.data.dataset, checkpoint=tgt.checkpoint,
                            epoch=read_state_dict(tgt.weights)[1].get("epoch"),
                            trained=(cfg.attack.norm, cfg.attack.eps) if tgt.run is not None else None)
    outcome = evaluate(source, images, labels, cfg.eval, out, resources=cfg.resources, checks=checks,
                       engine=engine, header=header, crash=crash)
    reused = outcome.chunks_total - outcome.chunks_computed
    precision = precision_params(cfg)["precision.eval"]
    table = format_table(outcome.result, [
        f"chunks: {outcome.chunks_total} ({outcome.chunks_computed} computed now, {reused} reused) in "
        f"{outcome.seconds:.1f} s -> {outcome.out_dir}", f"weights: {tgt.weights} (sha256 {sha[:12]})",
        f"precision: {precision} (raylab.precision; eval.bf16, eval.tf32)"])
    print(table, flush=True)
    outcome = dataclasses.replace(outcome, table=table)
    atomic_write_json(outcome.out_dir / "summary.json",
                      {**outcome.result.to_json(), "eval_config": dataclasses.asdict(cfg.eval),
                       "weights": str(tgt.weights), "weights_sha256": sha, "chunks": outcome.chunks_total,
                       "precision": precision, "table": table})
    if track and tgt.run is not None and (tgt.run / MLFLOW_RUN_FILE).is_file():
        run_id = (tgt.run / MLFLOW_RUN_FILE).read_text().strip()
        log_eval(_tracking_uri(cfg, tgt.run), run_id, outcome, sha, precision)
        outcome = dataclasses.replace(outcome, mlflow_run_id=run_id)
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# MLflow: the training run's own run gets the numbers, the table and the figures.

def _tracking_uri(cfg: ExperimentConfig, run: Path) -> str:
    """The store the run was tracked in: tracking.uri / $MLFLOW_TRACKING_URI, else SQLite under the run root
    (`<root>/<stage>/<name>`, raylab.runs), wherever this process runs from."""
    from raylab.tracking import resolve_tracking_uri

    return resolve_tracking_uri(dataclasses.replace(cfg.tracking, root=str(run.resolve().parents[1])))


def _figures(result: EvalResult) -> list[tuple[Any, str]]:
    from raylab.tracking import line_plot

    figures = []
    curve = result.certified_curve()
    if curve:
        figures.append((line_plot([r for r, _ in curve], {"certified accuracy": [a for _, a in curve]},
                                  "L2 radius", "certified accuracy",
                                  f"randomized smoothing, sigma={result.header.certify_sigma:g}"),
                        "certified_accuracy.png"))
    for check in result.checks:
        xlabel = "eps" if check.name == "accuracy_vs_eps" else "attack steps"
        figures.append((line_plot(check.xs, {check.name: check.accs}, xlabel, "robust accuracy",
                                  f"{check.name}: {'passed' if check.passed else 'FAILED'}"), f"{check.name}.png"))
    return figures


def log_eval(uri: str, run_id: str, outcome: EvalOutcome, weights_sha256: str, precision: str = "fp32") -> None:
    """Metrics at step = the checkpoint's epoch, tables/summary/figures under `eval/<checkpoint>-<fingerprint>/`,
    and tags naming the result directory, the weights it evaluated and what the numbers ran in
    (`eval.<checkpoint>.precision`; the run's `precision.eval` param is what its training config asked for)."""
    from raylab.tracking import Tracker

    result, header = outcome.result, outcome.result.header
    tracker = Tracker.attach(uri, run_id)  # attach: leave the finished training run's status alone
    prefix = f"eval/{header.checkpoint}-{outcome.out_dir.name}"
    tracker.log_metrics(outcome.metrics, step=header.epoch or 0)
    tracker.log_table(result.rows(), f"{prefix}/results")
    tracker.log_artifact(outcome.out_dir / "summary.json", prefix)  # + eval config, weights path and sha256
    tracker.log_text(outcome.table, f"{prefix}/table.txt")
    tracker.set_tags({f"eval.{header.checkpoint}.dir": str(outcome.out_dir),
                      f"eval.{header.checkpoint}.weights_sha256": weights_sha256,
                      f"eval.{header.checkpoint}.warnings": len(result.warnings()),
                      f"eval.{header.checkpoint}.precision": precision})
    for figure, name in _figures(result):
        tracker.log_figure(figure, f"{prefix}/{name}")
