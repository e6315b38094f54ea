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
in-flight shard retried by Ray (`max_restarts` / `max_task_retries` = resources.max_failures). GPU by
configuration alone (resources.gpus_per_actor). All paths (checkpoints, the store) must be on a filesystem every
node sees. One generate job per store at a time: leftover temp files of a crashed run are removed at start.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from raylab.cluster import init_ray
from raylab.config import ExperimentConfig, GenerateConfig, ResourcesConfig, to_flat, to_json
from raylab.data.datasets import get_dataset, load_splits
from raylab.data.shards import ShardStore, load_manifest, read_numpy, remove_temp_files, shard_name
from raylab.generate.checkpoint import MODEL_FILE, load_generator
from raylab.generate.sampler import sample_kwargs
from raylab.generate.seeds import generate_images
from raylab.io import sha256_file
from raylab.pipeline.gaussian import fit_gaussian, load_gaussian, sample_gaussian, save_gaussian
from raylab.pipeline.plan import SeedPlan, sampler_identity, set_identity
from raylab.pipeline.quality import Scorer, score_columns, scorer_fd, scorer_identity
from raylab.pipeline.select import load_scores, save_scores, scores_path
from raylab.runs import run_dir
from raylab.runtime import pick_device

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_SCORER = ASSETS / "scorer-digits" / "best.pt"  # the committed scorer, used for data.dataset=digits
NO_SCORER = "none"    # select.scorer_checkpoint value that turns scoring off
SCORE_BATCH = 256     # scorer chunk: fixed, so a shard's scores do not depend on any setting
GRID_PER_CLASS = 16   # images per class in the logged sample grids
SCORE_COLUMNS = ("label", "score", "pred", "confidence")
_DTYPES = {"label": np.int16, "score": np.float32, "pred": np.int16, "confidence": np.float32, "seed": np.int64}


class GenerateError(ValueError):
    """A one-line message naming the generate setting or file at fault and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# Generators: registry keyed like `generate.generator`.

@dataclass(frozen=True)
class GeneratorKind:
    default: Callable[[ExperimentConfig, Path], Path]              # the checkpoint when generate.checkpoint == ''
    load: Callable[[Path, GenerateConfig, torch.device], Any]      # in each sampler actor
    label_dim: Callable[[Any], int]                                # 0 = unconditional
    sample: Callable[[Any, list[int], np.ndarray, GenerateConfig, torch.device], np.ndarray]
    sampler_identity: Callable[[GenerateConfig], Optional[dict]]


GENERATORS: dict[str, GeneratorKind] = {}


def _default_edm(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """The committed tiny digits EDM (raylab.generate.sample_local.default_generator_path)."""
    hint = "pass generate.checkpoint=PATH (a raylab EDM directory or an official .pkl)"
    if cfg.data.dataset != "digits":
        raise GenerateError(f"generate.checkpoint: '' means the committed digits EDM, but data.dataset="
                            f"{cfg.data.dataset}; {hint}")
    from raylab.generate.sample_local import default_generator_path

    path = Path(default_generator_path())
    if not (path / "model.pt").is_file():
        raise GenerateError(f"generate.checkpoint: '' means the committed digits EDM, not in this checkout "
                            f"({path}); {hint}")
    return path


def _default_gaussian(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Fit the class-conditional Gaussian on data.dataset's training split once; reuse the file afterwards."""
    path = out_dir / "gaussian-fit.npz"
    if not path.exists():
        train = load_splits(cfg.data).train
        save_gaussian(fit_gaussian(train.images, train.labels, train.num_classes), path)
    return path


def _sample_edm(net: Any, seeds: list[int], labels: np.ndarray, gen: GenerateConfig,
                device: torch.device) -> np.ndarray:
    cond = labels if net.label_dim else None
    return generate_images(net, seeds, cond, sample_kwargs(gen), device=device, latents_on_cpu=gen.latents_on_cpu,
                           batch_size=gen.batch_size)[0]


GENERATORS["edm"] = GeneratorKind(
    default=_default_edm, load=lambda path, gen, device: load_generator(path).to(device).eval(),
    label_dim=lambda net: int(net.label_dim), sample=_sample_edm, sampler_identity=sampler_identity)
GENERATORS["gaussian"] = GeneratorKind(
    default=_default_gaussian, load=lambda path, gen, device: load_gaussian(path),
    label_dim=lambda fit: fit.num_classes,
    sample=lambda fit, seeds, labels, gen, device: sample_gaussian(fit, seeds, labels),
    sampler_identity=lambda gen: None)


def checkpoint_sha256(path: Path) -> str:
    """Content hash of a generator checkpoint: model.pt of a raylab EDM directory, else the file itself."""
    return sha256_file(path / MODEL_FILE if path.is_dir() else path)


# ---------------------------------------------------------------------------------------------------------------
# The job spec: everything an actor needs, checked in the driver before any compute.

@dataclass(frozen=True)
class JobSpec:
    generator: str
    checkpoint: str
    generate: GenerateConfig
    plan: SeedPlan
    scorer: Optional[dict[str, Any]]
    store: str
    use_gpu: bool
    identity: dict[str, Any]
    note: str = ""
    crash_marker: Optional[str] = None  # fault drill (tests): the first sampler call to claim it kills its actor


def resolve_scorer(cfg: ExperimentConfig) -> tuple[Optional[dict[str, Any]], str]:
    """(scorer identity or None, note): select.scorer_checkpoint ('none' = no scoring), else the committed
    digits scorer, else none."""
    if cfg.select.scorer_checkpoint.lower() == NO_SCORER:
        return None, "scoring off (select.scorer_checkpoint=none): shards get no score/pred/confidence"
    if cfg.select.scorer_checkpoint:
        return scorer_identity(cfg.select.scorer_checkpoint, cfg), ""
    if cfg.data.dataset == "digits" and DEFAULT_SCORER.is_file():
        return scorer_identity(DEFAULT_SCORER, cfg), ""
    return None, ("no scorer (select.scorer_checkpoint is '' and no committed scorer for "
                  f"{cfg.data.dataset}): shards get no score/pred/confidence; only select.policy=none applies")


def _resolve_generator(cfg: ExperimentConfig, out_dir: Path) -> tuple[str, Path]:
    kind = cfg.generate.generator
    if kind not in GENERATORS:
        raise GenerateError(f"generate.generator: {kind!r} generates nothing; use one of {', '.join(GENERATORS)}")
    path = Path(cfg.generate.checkpoint) if cfg.generate.checkpoint else GENERATORS[kind].default(cfg, out_dir)
    if not path.exists():
        raise GenerateError(f"generate.checkpoint: {path} does not exist")
    return kind, path


def plan_job(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None,
             crash_marker: Optional[str] = None) -> JobSpec:
    """Resolve generator, scorer, plan and identity, and open the store; no sampling happens here."""
    store_dir = Path(out_dir) if out_dir else run_dir(cfg, "generate").path / "shards"
    store_dir.mkdir(parents=True, exist_ok=True)
    kind, path = _resolve_generator(cfg, store_dir)
    num_classes = get_dataset(cfg.data.dataset).num_classes
    label_dim = GENERATORS[kind].label_dim(GENERATORS[kind].load(path, cfg.generate, torch.device("cpu")))
    if label_dim not in (0, num_classes):
        raise GenerateError(f"generate.checkpoint: {path} is conditioned on {label_dim} classes, data.dataset="
                            f"{cfg.data.dataset} has {num_classes}")
    scorer, note = resolve_scorer(cfg)
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
                   cfg.resources.gpus_per_actor > 0, identity, note, crash_marker)


# ---------------------------------------------------------------------------------------------------------------
# Stage UDFs. A row = one whole shard: first, last, image (its images' bytes), and after scoring the score
# columns, each packed as the bytes of a numpy array.

def _unpack(table: pa.Table, column: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(table.column(column)[0].as_buffer(), dtype=dtype)


def _packed_row(first: int, last: int, arrays: dict[str, np.ndarray], seconds: float) -> pa.Table:
    """One shard row; `sample_s` is the sampler's busy time for it (throughput accounting in the driver)."""
    cols = {"first": pa.array([first], pa.int64()), "last": pa.array([last], pa.int64()),
            "sample_s": pa.array([seconds], pa.float64())}
    cols |= {k: pa.array([np.ascontiguousarray(v).tobytes()], pa.large_binary()) for k, v in arrays.items()}
    return pa.table(cols)


def _append(row: pa.Table, arrays: dict[str, np.ndarray], seconds: float) -> pa.Table:
    """The row plus packed `arrays` and `score_s`, the scorer's busy time."""
    for k, v in arrays.items():
        row = row.append_column(k, pa.array([np.ascontiguousarray(v).tobytes()], pa.large_binary()))
    return row.append_column("score_s", pa.array([seconds], pa.float64()))


def _crash_once(marker: Optional[str]) -> None:
    """Fault drill: the first call anywhere to create `marker` kills its own process (a lost actor)."""
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class SamplerActor:
    """Holds the generator; each call samples the shards in its batch (batch_size=1: one shard)."""

    def __init__(self, spec: JobSpec):
        self.spec, self.device = spec, pick_device(spec.use_gpu)
        self.generator = GENERATORS[spec.generator].load(Path(spec.checkpoint), spec.generate, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        _crash_once(self.spec.crash_marker)
        return pa.concat_tables([self.sample_shard(int(a), int(b)) for a, b in zip(batch["first"], batch["last"])])

    def sample_shard(self, first: int, last: int) -> pa.Table:
        start, rows = time.perf_counter(), self.spec.plan.rows(first, last)
        kind = GENERATORS[self.spec.generator]
        images = kind.sample(self.generator, rows.rng_seeds, rows.class_cond, self.spec.generate, self.device)
        return _packed_row(first, last, {"image": images}, time.perf_counter() - start)


class ScorerActor:
    """Holds the scorer; adds label / score / pred / confidence to each shard row."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.scorer = Scorer.load(spec.scorer, pick_device(spec.use_gpu))

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.concat_tables([self.score_shard(table.slice(i, 1)) for i in range(table.num_rows)])

    def score_shard(self, row: pa.Table) -> pa.Table:
        start = time.perf_counter()
        first, last = row.column("first")[0].as_py(), row.column("last")[0].as_py()
        images = _unpack(row, "image", np.uint8).reshape(-1, 32, 32, 3)
        class_cond = self.spec.plan.rows(first, last).class_cond
        cols = score_columns(self.scorer.probs(images, SCORE_BATCH), class_cond)
        return _append(row, cols, time.perf_counter() - start)


def shard_columns(row: pa.Table, plan: SeedPlan) -> tuple[int, int, dict[str, np.ndarray]]:
    """A packed shard row → (first, last, shard columns) in the shard schema."""
    first, last = row.column("first")[0].as_py(), row.column("last")[0].as_py()
    seed = np.arange(first, last + 1, dtype=np.int64)
    class_cond = plan.locate(seed)[0].astype(np.int16)
    cols = {"image": _unpack(row, "image", np.uint8).reshape(-1, 32, 32, 3), "seed": seed, "class_cond": class_cond,
            "label": class_cond}
    cols |= {k: _unpack(row, k, _DTYPES[k]) for k in SCORE_COLUMNS if k in row.column_names}
    if len(cols["image"]) != len(seed) or (class_cond.min() < 0 and "pred" not in cols):
        raise GenerateError(f"shard {first}-{last}: {len(cols['image'])} images for {len(seed)} seeds, or an "
                            "unconditional shard without scorer pseudo-labels")
    return first, last, cols


WRITTEN = pa.schema([("first", pa.int64()), ("rows", pa.int64()), ("bytes", pa.int64()),
                     ("sample_s", pa.float64()), ("score_s", pa.float64())])


def write_shards(table: pa.Table, store: str, plan: SeedPlan) -> pa.Table:
    """Writer UDF: each shard row through ShardStore.write_shard; returns a `WRITTEN` row per shard (with the
    sampler's and scorer's busy seconds for it)."""
    out = []
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        first, last, cols = shard_columns(row, plan)
        entry = ShardStore(store).write_shard(first, last, cols)
        busy = {k: row.column(k)[0].as_py() if k in row.column_names else 0.0 for k in ("sample_s", "score_s")}
        out.append({"first": first, "rows": entry["rows"], "bytes": entry["bytes"]} | busy)
    return pa.Table.from_pylist(out, schema=WRITTEN)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.

def _pool(ds: Any, cls: type, spec: Any, size: int, res: ResourcesConfig, batch_format: str) -> Any:
    """An actor-pool stage; one shard per call and one call in flight per actor (shards are long: balance
    beats hiding dispatch latency, ray ActorPoolStrategy docs)."""
    import ray.data

    return ds.map_batches(
        cls, fn_constructor_kwargs={"spec": spec}, batch_size=1, batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
        num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None,
        # A lost actor is restarted and its shard retried; passed as remote args because map_batches has no
        # named parameter for them in Ray 2.60 (this path is deprecated there, removal planned for 2.64).
        max_restarts=res.max_failures, max_task_retries=res.max_failures)


def build_pipeline(spec: JobSpec, todo: Sequence[tuple[int, int]], res: ResourcesConfig) -> Any:
    """The lazy Ray Dataset of the job: one `WRITTEN` row per shard written."""
    import ray.data

    ds = ray.data.from_items([{"first": a, "last": b} for a, b in todo], override_num_blocks=len(todo))
    ds = _pool(ds, SamplerActor, spec, res.sampler_actors, res, "numpy")
    if spec.scorer is not None:
        ds = _pool(ds, ScorerActor, spec, res.scorer_actors, res, "pyarrow")
    return ds.map_batches(write_shards, fn_kwargs={"store": spec.store, "plan": spec.plan}, batch_size=1,
                          batch_format="pyarrow")


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
                + (f"; {self.spec.note}" if self.spec.note else ""))


def run_generate(cfg: ExperimentConfig, out_dir: str | os.PathLike | None = None, *, track: bool = True,
                 parent_run_id: Optional[str] = None, fd_images: int = 1000,
                 crash_marker: Optional[str] = None) -> GenerateOutcome:
    """Generate the missing shards of `cfg`'s set into `out_dir` (default run_dir(cfg, "generate")/shards).

    `fd_images`: generated and training images compared by "FD (scorer features)" in the MLflow report (0 = off);
    `crash_marker`: the fault drill of the tests (see `_crash_once`)."""
    spec = plan_job(cfg, out_dir, crash_marker)
    store = ShardStore(spec.store)
    remove_temp_files(store.root)
    todo = store.missing(spec.plan.shards())
    start = time.perf_counter()
    if todo:
        init_ray()  # only now: every check above runs before a Ray instance starts
    written = build_pipeline(spec, todo, cfg.resources).take_all() if todo else []
    outcome = GenerateOutcome(
        store.root, store.identity_hash, spec, shards_written=len(written), shards_present=len(spec.plan.shards())
        - len(todo), images_written=sum(int(r["rows"]) for r in written), seconds=time.perf_counter() - start,
        sample_seconds=sum(r["sample_s"] for r in written), score_seconds=sum(r["score_s"] for r in written),
        sampler_actors=cfg.resources.sampler_actors)
    if track:
        outcome = replace(outcome, mlflow_run_id=log_generation(cfg, outcome, parent_run_id, fd_images))
    print(outcome.summary(), flush=True)
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
    """Class balance, score distribution and FD (scorer features) of a finished store (non-image columns only)."""
    columns = ["label"] + (["score"] if spec.scorer else [])
    cols = read_numpy(store, columns=columns, verify=False)  # statistics only; `raylab data verify` checks bytes
    classes, counts = np.unique(cols["label"], return_counts=True)
    report: dict[str, Any] = {"class_counts": {int(c): int(n) for c, n in zip(classes, counts)},
                              "scores": cols.get("score"), "fd": None}
    if spec.scorer and fd_images > 0:
        report["fd"] = _scorer_fd(store, spec, cfg, fd_images)
    return report


def _scorer_fd(store: Path, spec: JobSpec, cfg: ExperimentConfig, n: int) -> float:
    """FD (scorer features) between about n generated images and as many random training images."""
    generated = read_numpy(store, columns=["image"], rows=_first_rows(store, n), verify=False)["image"]
    train = load_splits(cfg.data).train
    real = train.images[np.sort(np.random.default_rng(0).permutation(len(train))[:len(generated)])]
    return scorer_fd(Scorer.load(spec.scorer), generated, real)


def _first_rows(store: Path, n: int, max_shards: int = 10) -> dict[str, np.ndarray]:
    """About n rows from at most `max_shards` shards spread over the plan (a prefix of each): shards are
    class-ordered, so every class contributes without reading the whole store."""
    names = [p.name for p in ShardStore(store).shard_paths()]
    picked = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, min(len(names), max_shards)).round()
                                          .astype(int))]
    entries, per = load_manifest(store)["shards"], -(-n // len(picked))
    return {name: np.arange(min(per, entries[name]["rows"])) for name in picked}


def log_generation(cfg: ExperimentConfig, outcome: GenerateOutcome, parent_run_id: Optional[str],
                   fd_images: int) -> str:
    """One MLflow run: flat params, throughput, identity, per-class sample grids, class balance, score histogram."""
    from raylab.tracking import Tracker, histogram, image_grid

    spec, store = outcome.spec, outcome.store
    report = generation_report(store, spec, cfg, fd_images)
    with Tracker.start(cfg.tracking, f"generate-{outcome.identity_hash[:12]}", params=to_flat(cfg),
                       config_json=to_json(cfg), parent_run_id=parent_run_id,
                       tags={"raylab.stage": "generate", "dataset.identity": outcome.identity_hash,
                             "dataset.store": str(store), "generate.note": spec.note or "-"}) as tracker:
        tracker.log_metrics({"images_written": outcome.images_written, "shards_written": outcome.shards_written,
                             "shards_present": outcome.shards_present, "images_total": spec.plan.size,
                             "seconds": outcome.seconds, "images_per_s": outcome.images_per_s,
                             "sampler_busy_s": outcome.sample_seconds, "scorer_busy_s": outcome.score_seconds,
                             "sampler_utilization": outcome.sampler_utilization}, step=0)
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
        if report["fd"] is not None:
            tracker.log_metrics({"fd_scorer_features": report["fd"]}, step=0)
            tracker.set_tags({"fd_scorer_features.label": f"FD (scorer features), {fd_images} images vs train"})
        return tracker.run_id


# ---------------------------------------------------------------------------------------------------------------
# A scoring pass over an existing store (the second scorer of select.policy=agreement).

class ShardScorerActor:
    """Reads one verified shard per call and scores its images against their stored labels."""

    def __init__(self, store: str, scorer: dict[str, Any], use_gpu: bool):
        self.store, self.scorer = store, Scorer.load(scorer, pick_device(use_gpu))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("seed", "score", "pred", "confidence")}
        for name, rows in zip(batch["name"], batch["rows"]):
            data = read_numpy(self.store, columns=["image", "label", "seed"], rows={str(name): np.arange(rows)})
            cols = score_columns(self.scorer.probs(data["image"], SCORE_BATCH), data["label"]) | {"seed": data["seed"]}
            for k in out:
                out[k].append(cols[k])
        return {k: np.concatenate(v) for k, v in out.items()}


def _scores_current(path: Path, manifest: dict) -> bool:
    """A cached scores file made for this store identity and covering all of its rows (a resumed store grows)."""
    if not path.is_file():
        return False
    meta, cols = load_scores(path)
    return (meta.get("identity_hash") == manifest["identity_hash"]
            and len(cols["seed"]) == sum(e["rows"] for e in manifest["shards"].values()))


def score_store(cfg: ExperimentConfig, store: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """Score every image of `store` with the classifier at `checkpoint`; the result is cached as
    `store/scores/<sha16>.npz` (seed, score, pred, confidence) and reused when present."""
    import ray.data

    store = Path(store).resolve()
    manifest = load_manifest(store)
    scorer = scorer_identity(checkpoint, cfg)
    path = scores_path(store, scorer["sha256"])
    if _scores_current(path, manifest):
        return path
    entries = [{"name": n, "rows": e["rows"]} for n, e in manifest["shards"].items()]
    if not entries:
        raise GenerateError(f"{store}: the store has no shards to score")
    res = cfg.resources
    init_ray()
    ds = ray.data.from_items(entries, override_num_blocks=len(entries)).map_batches(
        ShardScorerActor, fn_constructor_kwargs={"store": str(store), "scorer": scorer,
                                                 "use_gpu": res.gpus_per_actor > 0},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=res.scorer_actors),
        num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor or None)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seed", "score", "pred", "confidence")}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            cols[k].append(batch[k])
    merged = {k: np.concatenate(v).astype(_DTYPES[k]) for k, v in cols.items()}
    meta = {"identity_hash": manifest["identity_hash"], "scorer": {k: v for k, v in scorer.items() if k != "file"}}
    return save_scores(path, merged, meta)
