"""The generation job on Ray Data: seed ranges → sampler actors → scorer actors → seed-addressed Parquet shards.

    shard ranges (one row per *missing* shard: first/last plan index)
      └─ map_batches(SamplerActor, ActorPoolStrategy(size=resources.sampler_actors), batch_size=1)
           one call samples one shard, generate.batch_size images at a time, each image from its own seed
      └─ map_batches(ScorerActor, ActorPoolStrategy(size=resources.scorer_actors), batch_size=1)   [if a scorer]
           adds label (pseudo-label when unconditional), score = p(label), pred, confidence
      └─ map_batches(write_shards, batch_size=1)
           ShardStore.write_shard: temp file → fsync → rename → manifest entry under a lock

Every row between the stages is one *whole shard* (its images packed into one binary value), so Ray Data's block
splitting can never cut a shard, every stage can run with an integer batch size (required with GPUs), and the
scorer always sees the same images in the same chunks. Ray Data's own `write_parquet` is not used: its file names
are not seed-addressed and a retried task could leave a second copy.

Resumable: only shards missing from the store are planned. Elastic: the bytes of a shard depend only on the set's
identity (raylab.pipeline.plan), not on actor count, batch size or retries; actors are restarted and their
in-flight shard retried by Ray Data's actor-pool defaults (unlimited restarts and retries). GPU by
configuration alone: samplers and scorers are separate actor pools, each with its own resources
(resources.cpus_per_actor / gpus_per_actor for samplers, resources.scorer_cpus_per_actor / scorer_gpus_per_actor
for scorers; `raylab.pipeline.pools`). All paths (checkpoints, the store) must be on a filesystem every node sees.
One generate job per store at a time, enforced by a lock file in the store (`store_lock`): leftover temp files of a
crashed run are removed at start, which would delete a running job's in-flight shards.

Quality (MLflow report): "FD (scorer features)" — the scorer's penultimate features, NOT Inception FID — and, with
generate.inception_weights, "FID (Inception)", both between generated and real *test* images.

Split by concern: `raylab.pipeline.generators` holds the generator registry and `GenerateError`,
`raylab.pipeline.actors` the `JobSpec` and every stage UDF / actor class, `raylab.pipeline.pools` the actor pools'
resources, `raylab.pipeline.scoring` the scoring pass over a store; this module plans the job, builds and runs the
pipeline and writes the MLflow report. Import each name from its home module.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from raylab.cluster import init_ray, root_token
from raylab.config import ExperimentConfig, ResourcesConfig, to_flat, to_json
from raylab.data.datasets import check_dataset, get_dataset, load_splits
from raylab.data.shards import ShardStore, read_numpy
from raylab.data.shard_layout import load_manifest, remove_temp_files, shard_name
from raylab.io import exclusive
from raylab.pipeline.actors import JobSpec, SamplerActor, ScorerActor, write_shards
from raylab.pipeline.generators import GENERATORS, GenerateError, checkpoint_sha256
from raylab.pipeline.pools import actor_pool, stage_resources
from raylab.pipeline.plan import SeedPlan, set_identity
from raylab.pipeline.quality import (FD_LABEL, FID_LABEL, InceptionFeatures, QualityError, Scorer, inception_fid,
                                     scorer_fd, scorer_identity)
from raylab.pipeline.select import check_policy
from raylab.runs import run_dir

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_SCORER = ASSETS / "scorer-digits" / "best.pt"  # the committed scorer, used for data.dataset=digits
NO_SCORER = "none"    # select.scorer_checkpoint value that turns scoring off
GRID_PER_CLASS = 16   # images per class in the logged sample grids
LOCK_FILE = ".generate.lock"  # in the store: held by the one generate job running on it


# ---------------------------------------------------------------------------------------------------------------
# Planning: everything an actor needs (`JobSpec`), checked in the driver before any compute.

def resolve_scorer(cfg: ExperimentConfig) -> tuple[Optional[dict[str, Any]], str]:
    """(scorer identity or None, note): select.scorer_checkpoint ('none' = no scoring), else the committed
    digits scorer, else none."""
    if cfg.select.scorer_checkpoint.lower() == NO_SCORER:
        return None, "scoring off (select.scorer_checkpoint=none): shards get no score/pred/confidence"
    if cfg.select.scorer_checkpoint:
        return scorer_identity(cfg.select.scorer_checkpoint), ""
    if cfg.data.dataset == "digits" and DEFAULT_SCORER.is_file():
        return scorer_identity(DEFAULT_SCORER), ""
    return None, ("no scorer (select.scorer_checkpoint is '' and no committed scorer for "
                  f"{cfg.data.dataset}): shards get no score/pred/confidence; only select.policy=none applies")


def _check_generator(cfg: ExperimentConfig) -> None:
    """generate.generator exists and its checkpoint can be had, checked before anything runs (a CIFAR-10 sweep
    without generate.checkpoint used to start every trial only to fail in each)."""
    kind = cfg.generate.generator
    if kind not in GENERATORS:
        raise GenerateError(f"generate.generator: {kind!r} generates nothing; use one of {', '.join(GENERATORS)}")
    if not cfg.generate.checkpoint:
        GENERATORS[kind].check_default(cfg)
    elif not Path(cfg.generate.checkpoint).exists():
        raise GenerateError(f"generate.checkpoint: {cfg.generate.checkpoint} does not exist")


def _resolve_generator(cfg: ExperimentConfig, out_dir: Path) -> tuple[str, Path]:
    _check_generator(cfg)
    kind = cfg.generate.generator
    return kind, Path(cfg.generate.checkpoint) if cfg.generate.checkpoint else GENERATORS[kind].default(cfg, out_dir)


def _check_inception(cfg: ExperimentConfig) -> None:
    """generate.inception_weights: a TorchScript detector with the expected interface, checked before sampling."""
    if cfg.generate.inception_weights:
        try:
            InceptionFeatures(cfg.generate.inception_weights).check()
        except QualityError as err:
            raise GenerateError(f"generate.inception_weights: {err}") from None


def store_path(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None) -> Path:
    """`out_dir`, or the run directory's shards/ by default."""
    return Path(out_dir) if out_dir else run_dir(cfg, "generate").path / "shards"


Inputs = tuple[Optional[dict[str, Any]], str]  # `check_inputs`: (scorer identity or None, note)


def check_inputs(cfg: ExperimentConfig) -> Inputs:
    """What is refused before a store exists or anything runs: the Inception detector, the original dataset's files
    (the quality report reads its test set after sampling every shard) and the scorer, whose architecture its
    config.json must state (raylab.pipeline.quality.scorer_identity), the generator and the selection policy's
    need of a scorer. Returns `resolve_scorer`'s answer."""
    _check_inception(cfg)
    check_dataset(cfg.data)
    _check_generator(cfg)
    scorer, note = resolve_scorer(cfg)
    check_policy(cfg.select, scorer is not None, note)
    return scorer, note


def plan_job(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None,
             fault_after_shards: Optional[tuple[str, int]] = None, inputs: Optional[Inputs] = None) -> JobSpec:
    """Resolve generator, scorer, plan and identity, and open the store; no sampling happens here. `inputs`:
    `check_inputs(cfg)` when the caller already ran it."""
    scorer, note = inputs or check_inputs(cfg)
    store_dir = store_path(cfg, out_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    kind, path = _resolve_generator(cfg, store_dir)
    num_classes = get_dataset(cfg.data.dataset).num_classes
    label_dim = GENERATORS[kind].label_dim(GENERATORS[kind].load(path, cfg.generate, torch.device("cpu")))
    if label_dim not in (0, num_classes):
        raise GenerateError(f"generate.checkpoint: {path} is conditioned on {label_dim} classes, data.dataset="
                            f"{cfg.data.dataset} has {num_classes}")
    if label_dim == 0 and scorer is None:
        raise GenerateError("unconditional generator: its images need scorer pseudo-labels, set "
                            "select.scorer_checkpoint=PATH (" + note + ")")
    if scorer is not None and get_dataset(scorer["dataset"]).num_classes != num_classes:
        raise GenerateError(f"select.scorer_checkpoint: scorer of {scorer['dataset']}, data.dataset is "
                            f"{cfg.data.dataset}")
    plan = SeedPlan.from_config(cfg.generate, num_classes, conditional=label_dim > 0)
    generator = {"kind": kind, "sha256": checkpoint_sha256(path), "label_dim": label_dim}
    scorer_id = None if scorer is None else {k: v for k, v in scorer.items() if k != "file"}
    identity = set_identity(generator, GENERATORS[kind].sampler_identity(cfg.generate), plan, scorer_id)
    ShardStore(store_dir).create_or_open(identity)
    return JobSpec(kind, str(path), cfg.generate, plan, scorer, str(store_dir.resolve()),
                   stage_resources(cfg.resources, "sampler").use_gpu, identity, note, fault_after_shards)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Held while one generate job runs on `store`; a second job fails at once instead of racing the first (its
    start-up `remove_temp_files` would delete the first job's in-flight shard files). Sweeps also lock their
    artifact directory, in another file (raylab.tune.artifacts), so the two never wait on each other."""
    store.mkdir(parents=True, exist_ok=True)
    busy = GenerateError(f"{store}: another `raylab generate` is running on this store (it holds "
                         f"{store / LOCK_FILE}); wait for it to finish or pass another --out")
    with exclusive(store / LOCK_FILE, busy=busy):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Resources: samplers and scorers are separate actor pools, each with its own CPUs and GPUs (GPU by config alone).

# ---------------------------------------------------------------------------------------------------------------
# The pipeline.

def build_pipeline(spec: JobSpec, todo: Sequence[tuple[int, int]], res: ResourcesConfig) -> Any:
    """The lazy Ray Dataset of the job: one `WRITTEN` row per shard written."""
    import ray.data

    ds = ray.data.from_items([{"first": a, "last": b} for a, b in todo], override_num_blocks=len(todo))
    stages = [("sampler", SamplerActor, "numpy")] + ([("scorer", ScorerActor, "pyarrow")] if spec.scorer else [])
    for stage, cls, fmt in stages:
        stage_spec = replace(spec, use_gpu=stage_resources(res, stage).use_gpu)  # each pool its own device
        ds = actor_pool(ds, cls, {"spec": stage_spec}, stage, res, fmt)
    return ds.map_batches(write_shards, fn_kwargs={"store": spec.store, "plan": spec.plan, "root": spec.root},
                          batch_size=1, batch_format="pyarrow")


@dataclass(frozen=True)
class GenerateOutcome:
    store: Path
    identity_hash: str
    spec: JobSpec
    shards_written: int
    shards_present: int   # already in the store before this run (resume)
    images_written: int
    seconds: float               # wall time of the Ray Data job (actor start-up included)
    sample_seconds: float = 0.0  # summed busy time of the sampler actors
    score_seconds: float = 0.0   # summed busy time of the scorer actors
    sampler_actors: int = 1
    mlflow_run_id: Optional[str] = None
    quality: dict[str, float] = field(default_factory=dict)  # QUALITY_METRICS measured for the MLflow report

    @property
    def device_seconds(self) -> float:
        """The device time this run spent: sampler and scorer actors' busy time (the cost ledger)."""
        return self.sample_seconds + self.score_seconds

    @property
    def images_per_s(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def sampler_utilization(self) -> float:
        """Fraction of the sampler pool's wall time spent sampling (1 = no pipeline overhead at all)."""
        return self.sample_seconds / (self.seconds * self.sampler_actors) if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"generate: {self.images_written} images in {self.shards_written} shards "
                f"({self.shards_present} already present) in {self.seconds:.1f} s = {self.images_per_s:.1f} "
                f"images/s, samplers busy {self.sampler_utilization:.0%} → {self.store} "
                f"(identity {self.identity_hash[:12]})"
                + "".join(f"; {k} {v:.4g}" for k, v in self.quality.items())
                + (" (vs real test images)" if self.quality else "")
                + (f"; {self.spec.note}" if self.spec.note else ""))


def run_generate(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None, *, track: bool = True,
                 parent_run_id: Optional[str] = None, fd_images: int = 1000,
                 fault_after_shards: Optional[tuple[str, int]] = None) -> GenerateOutcome:
    """Generate the missing shards of `cfg`'s set into `out_dir` (default run_dir(cfg, "generate")/shards), holding
    the store's lock throughout (a second job on the same store fails at once, before any compute).

    `fd_images`: generated images compared with as many real test images by `QUALITY_METRICS` in the MLflow report
    (0 = off); `fault_after_shards`: the tests' kill drill (see `actors._fault_drill`)."""
    inputs = check_inputs(cfg)  # before the store (its run directory, its lock file) exists
    store_dir = store_path(cfg, out_dir)
    with store_lock(store_dir):
        outcome = _generate_locked(cfg, store_dir, fault_after_shards, inputs)
        if track:
            report = generation_report(outcome.store, outcome.spec, cfg, fd_images)
            outcome = replace(outcome, quality=report["quality"],
                              mlflow_run_id=log_generation(cfg, outcome, parent_run_id, report))
    print(outcome.summary(), flush=True)
    return outcome


def _generate_locked(cfg: ExperimentConfig, store_dir: Path, fault_after_shards: Optional[tuple[str, int]],
                     inputs: Inputs) -> GenerateOutcome:
    spec = plan_job(cfg, store_dir, fault_after_shards, inputs)
    store = ShardStore(spec.store)
    remove_temp_files(store.root)
    for line in store.set_aside_corrupt(spec.plan.shards()):  # a rerun repairs what it finds, it does not trust
        print(line, flush=True)
    todo = store.missing(spec.plan.shards())
    start = time.perf_counter()
    if todo:
        init_ray(shared_root=cfg.tracking.root)  # only now: every check above runs before Ray starts
        spec = replace(spec, root=root_token(cfg.tracking.root))  # what each actor and writer task checks
    written = build_pipeline(spec, todo, cfg.resources).take_all() if todo else []
    outcome = GenerateOutcome(
        store.root, store.identity_hash, spec, shards_written=len(written), shards_present=len(spec.plan.shards())
        - len(todo), images_written=sum(int(r["rows"]) for r in written), seconds=time.perf_counter() - start,
        sample_seconds=sum(r["sample_s"] for r in written), score_seconds=sum(r["score_s"] for r in written),
        sampler_actors=cfg.resources.sampler_actors)
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# MLflow report (driver).

def sample_images(store: Path, plan: SeedPlan, per_class: int = GRID_PER_CLASS) -> dict[int, np.ndarray]:
    """{label: first `per_class` images of that label}."""
    idx = (np.concatenate([plan.first_of_class(c, per_class) for c in plan.classes]) if plan.conditional
           else np.arange(min(plan.size, per_class * 10), dtype=np.int64))
    first, last = plan.shard_of(idx)
    names = [shard_name(int(a), int(b)) for a, b in zip(first, last)]
    rows: dict[str, list[int]] = {}
    for name, i, a in zip(names, idx, first):
        rows.setdefault(name, []).append(int(i - a))
    # verify=False: a report of the store this job just wrote (sha256 of whole shards is `raylab data verify`'s job)
    data = read_numpy(store, columns=["image", "label"], rows={k: np.array(v) for k, v in rows.items()},
                      verify=False)
    return {int(c): data["image"][data["label"] == c][:per_class] for c in np.unique(data["label"])}


def generation_report(store: Path, spec: JobSpec, cfg: ExperimentConfig, fd_images: int) -> dict[str, Any]:
    """Class balance, score distribution and `quality_metrics` of a finished store."""
    columns = ["label"] + (["score"] if spec.scorer else [])
    cols = read_numpy(store, columns=columns, verify=False)  # statistics only; `raylab data verify` checks bytes
    classes, counts = np.unique(cols["label"], return_counts=True)
    quality, sizes = quality_metrics(store, spec, cfg, fd_images)
    return {"class_counts": {int(c): int(n) for c, n in zip(classes, counts)}, "scores": cols.get("score"),
            "quality": quality, "quality_images": sizes}


@dataclass(frozen=True)
class QualityMetric:
    label: str                                                   # what the number is, logged as a tag beside it
    applies: Callable[[JobSpec, ExperimentConfig], bool]
    measure: Callable[[JobSpec, ExperimentConfig, np.ndarray, np.ndarray], float]  # (generated, real) uint8


# Both between generated and real *test* images (the generation-pipeline issue); keyed by MLflow metric name.
QUALITY_METRICS: dict[str, QualityMetric] = {
    "fd_scorer_features": QualityMetric(
        f"{FD_LABEL}: the scorer's penultimate features, not Inception FID",
        applies=lambda spec, cfg: spec.scorer is not None,
        measure=lambda spec, cfg, gen, real: scorer_fd(Scorer.load(spec.scorer), gen, real)),
    "fid_inception": QualityMetric(
        f"{FID_LABEL}: pool features of the generate.inception_weights detector",
        applies=lambda spec, cfg: bool(cfg.generate.inception_weights),
        measure=lambda spec, cfg, gen, real: inception_fid(cfg.generate.inception_weights, gen, real)),
}


def quality_metrics(store: Path, spec: JobSpec, cfg: ExperimentConfig, n: int
                    ) -> tuple[dict[str, float], tuple[int, int]]:
    """({metric: value} of the applicable `QUALITY_METRICS`, (generated, real) image counts): about n generated
    images against min(n, test size) random real test images of data.dataset; n = 0 measures nothing."""
    names = [k for k, m in QUALITY_METRICS.items() if m.applies(spec, cfg)]
    if n <= 0 or not names:
        return {}, (0, 0)
    generated = read_numpy(store, columns=["image"], rows=_first_rows(store, n), verify=False)["image"]
    test = load_splits(cfg.data).test
    real = test.images[np.sort(np.random.default_rng(0).permutation(len(test))[:min(n, len(test))])]
    return {k: QUALITY_METRICS[k].measure(spec, cfg, generated, real) for k in names}, (len(generated), len(real))


def _first_rows(store: Path, n: int, max_shards: int = 10) -> dict[str, np.ndarray]:
    """About n rows from at most `max_shards` shards spread over the plan (a prefix of each): shards are
    class-ordered, so every class contributes without reading the whole store."""
    names = [p.name for p in ShardStore(store).shard_paths()]
    picked = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, min(len(names), max_shards)).round()
                                          .astype(int))]
    entries, per = load_manifest(store)["shards"], -(-n // len(picked))
    return {name: np.arange(min(per, entries[name]["rows"])) for name in picked}


def log_generation(cfg: ExperimentConfig, outcome: GenerateOutcome, parent_run_id: Optional[str],
                   report: dict[str, Any]) -> str:
    """One MLflow run: flat params, throughput, identity, per-class sample grids, class balance, score histogram,
    and the quality metrics of `report` (`generation_report`), each with a label tag."""
    from raylab.tracking import Tracker, histogram, image_grid

    spec, store = outcome.spec, outcome.store
    with Tracker.start(cfg.tracking, f"generate-{outcome.identity_hash[:12]}", params=to_flat(cfg),
                       config_json=to_json(cfg), parent_run_id=parent_run_id,
                       tags={"raylab.stage": "generate", "dataset.identity": outcome.identity_hash,
                             "dataset.store": str(store), "generate.note": spec.note or "-"}) as tracker:
        tracker.log_metrics({"images_written": outcome.images_written, "shards_written": outcome.shards_written,
                             "shards_present": outcome.shards_present, "images_total": spec.plan.size,
                             "seconds": outcome.seconds, "images_per_s": outcome.images_per_s,
                             "sampler_busy_s": outcome.sample_seconds, "scorer_busy_s": outcome.score_seconds,
                             "sampler_utilization": outcome.sampler_utilization,
                             "cost_generate_device_s": outcome.device_seconds,
                             "cost_per_generated_image_s": outcome.device_seconds / max(outcome.images_written, 1)},
                            step=0)
        tracker.log_dict(spec.identity, "dataset/identity.json")
        tracker.log_artifact(store / "manifest.json", "dataset")
        tracker.log_metrics({f"class_count/{c}": n for c, n in report["class_counts"].items()}, step=0)
        tracker.log_table([{"label": c, "images": n} for c, n in report["class_counts"].items()],
                          "tables/class_balance")
        for c, images in sample_images(store, spec.plan).items():
            tracker.log_figure(image_grid(images, nrow=8, title=f"class {c}"), f"samples/class_{c:03d}.png")
        if report["scores"] is not None:
            scores = report["scores"]
            tracker.log_figure(histogram(scores, title="scorer probability of the label", xlabel="score"),
                               "plots/score_hist.png")
            tracker.log_metrics({"score_mean": float(scores.mean()), "score_median": float(np.median(scores))}, 0)
        if report["quality"]:
            n_gen, n_real = report["quality_images"]
            tracker.log_metrics(report["quality"], step=0)
            tracker.set_tags({f"{k}.label": f"{QUALITY_METRICS[k].label}; {n_gen} generated vs {n_real} real test "
                              "images" for k in report["quality"]})
        return tracker.run_id


