"""MLflow store access: where runs live, experiments, the `Tracker` that logs one run, and read-back helpers.

Everything goes through an explicit `MlflowClient(uri)` and an explicit run id, never through mlflow's fluent
global "active run", so the same code works in the driver, in Ray workers and in threads
(reference/ray_mlflow.md §3). A `Tracker` pickles as (uri, run id): hand it to a Ray task and it re-attaches.

Only drivers log: Ray Train workers report their metrics to the Train controller, whose `raylab.raytrain.EpochLogger`
logs them here, so a worker node never needs to reach the tracking server (README "Scale out").

Stores (reference/ray_mlflow.md §3, §6): MLflow 3 defaults to SQLite; the file store is in maintenance mode.
The default here is `sqlite:///<abs tracking.root>/mlflow.db` with artifacts under `<abs tracking.root>/mlartifacts`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from raylab.config import TrackingConfig
from raylab.io import exclusive


class TrackingError(ValueError):
    """A one-line message naming the tracking thing (uri, run, experiment, argument) and what is allowed."""


# MLflow 3.17 accepts 6000-char param values, but the limit has changed between releases and servers
# (mlflow/mlflow#3931): log a portable prefix and keep the full config in the `config.json` artifact.
PARAM_VALUE_LIMIT = 500
TAG_VALUE_LIMIT = 5000
PARAMS_PER_BATCH = 100      # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000    # mlflow.utils.validation.MAX_METRICS_PER_BATCH
DIGEST_LIMIT = 36           # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the UI's run description (Overview page), Markdown
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3.x opens an experiment on its GenAI pages (traces, an assistant) unless the experiment says it holds model
# training: the UI reads this tag (values of its ExperimentKind enum, mlflow/server/js, 3.17.2). The `?workflowType=
# machine_learning` query of the URL `raylab ui` prints does the same for the side bar (raylab.tracking.ui).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_REMOTE_SCHEMES = ("http://", "https://", "databricks")


# ---------------------------------------------------------------------------------------------------------------
# Where the store is.

def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """`tracking.uri` if set, else $MLFLOW_TRACKING_URI, else SQLite under the run root."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.root).resolve() / 'mlflow.db'}"


def artifact_root(cfg: TrackingConfig) -> Path:
    """`<abs tracking.root>/mlartifacts`: experiment artifact locations and the UI's --artifacts-destination."""
    return Path(cfg.root).resolve() / "mlartifacts"


def pin_tracking(cfg: TrackingConfig) -> TrackingConfig:
    """The same store with nothing left to resolve later: absolute root and explicit uri. Do this in the driver
    before sending a config to Ray workers, whose cwd and environment differ from the driver's."""
    return dataclasses.replace(cfg, root=str(Path(cfg.root).resolve()), uri=resolve_tracking_uri(cfg))


def is_remote_uri(uri: str) -> bool:
    return uri.startswith(_REMOTE_SCHEMES)


def _sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise processes on a local SQLite store: MLflow's schema migrations race when two processes open a
    fresh database at once (measured: alembic 'expected to match one row' errors)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    with exclusive(db.with_name(db.name + ".lock")):
        yield


_READY: set[str] = set()


def client_for(uri: str) -> MlflowClient:
    """An `MlflowClient` on `uri`, with the store created (under a lock) the first time this process sees it."""
    if uri in _READY:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the constructor already opens the store
        client.search_experiments(max_results=1)
    _READY.add(uri)
    return client


def _error_code(exc: MlflowException) -> int:
    return ErrorCode.Value(exc.error_code) if isinstance(exc.error_code, str) else exc.error_code


# ---------------------------------------------------------------------------------------------------------------
# Experiments.

def _experiment_location(cfg: TrackingConfig, name: str) -> Optional[str]:
    """Explicit artifact location for local stores. Without it, an experiment first created inside a Ray worker
    gets Ray's ephemeral session dir (reference/ray_mlflow.md §3). Remote servers choose their own (proxied)."""
    if is_remote_uri(resolve_tracking_uri(cfg)):
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
    return (artifact_root(cfg) / slug).as_uri()


def ensure_experiment(cfg: TrackingConfig, name: Optional[str] = None) -> str:
    """Id of experiment `name` (default `tracking.experiment`), created if missing. Call it in the driver.

    Idempotent, and safe when processes race: a losing `create_experiment` re-reads the winner's experiment.
    """
    name = name or cfg.experiment
    uri = resolve_tracking_uri(cfg)
    client = client_for(uri)
    with _store_lock(uri):
        existing = client.get_experiment_by_name(name)
        if existing is not None and existing.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore it (mlflow experiments "
                                "restore) or choose another tracking.experiment")
        if existing is not None:
            return _training_kind(client, existing)
        try:
            experiment_id = client.create_experiment(name, artifact_location=_experiment_location(cfg, name),
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            winner = client.get_experiment_by_name(name)  # another process (on a shared server) won the race
            if winner is None:
                raise
            return _training_kind(client, winner)
        return experiment_id


def _training_kind(client: MlflowClient, experiment: Any) -> str:
    """Mark an experiment (also one made by an older raylab or by MLflow) as model training, for the UI."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------------------------
# Which code made a run.

def _git(root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else the source tree's `__version__`."""
    from importlib import metadata

    try:
        return metadata.version("raylab")
    except metadata.PackageNotFoundError:
        from raylab import __version__
        return __version__


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


@functools.lru_cache(maxsize=1)
def code_version_tags() -> dict[str, str]:
    """Tags every run gets: package version, git commit and dirty flag of the checkout raylab is imported from
    ("unknown" when it is not a git checkout, e.g. a wheel install), and MLflow's own source tags (the UI's Source
    and Version columns)."""
    root = Path(__file__).resolve().parents[2]
    version = package_version()
    tags = {"raylab.version": version, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": Path(sys.argv[0]).name or "python", "mlflow.user": _user()}
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD") if top and Path(top).resolve() == root else None
    if commit is None:
        return tags | {"raylab.git_commit": "unknown", "raylab.git_dirty": "unknown", "raylab.code_version": version}
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return tags | {"raylab.git_commit": commit, "raylab.git_dirty": str(dirty).lower(),
                   "mlflow.source.git.commit": commit,
                   "raylab.code_version": f"{version}+g{commit[:10]}{'.dirty' if dirty else ''}"}


# ---------------------------------------------------------------------------------------------------------------
# Value formatting shared by params and tags.

def _param_text(value: Any) -> str:
    """Tuples as '1,2' and everything else as str(), so `config.from_flat` parses params back."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------------------------
# One run.

class Tracker:
    """Logs to one MLflow run through an explicit client: params, metrics per step, figures, tables, lineage.

    Use as a context manager to end the run FINISHED, or FAILED when the body raises (KILLED on Ctrl-C).
    """

    def __init__(self, client: MlflowClient, uri: str, run_id: str) -> None:
        self._client, self.uri, self.run_id = client, uri, run_id
        self.ended = False

    # -- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg_tracking: TrackingConfig, run_name: str, *, params: Mapping[str, Any], config_json: str,
              parent_run_id: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None) -> "Tracker":
        """Open a new run in `tracking.experiment`, log the flat `params` and the full config as `config.json`."""
        try:
            json.loads(config_json)
        except (TypeError, ValueError):
            raise TrackingError(f"config_json: not valid JSON for run {run_name!r}") from None
        uri = resolve_tracking_uri(cfg_tracking)
        experiment_id = ensure_experiment(cfg_tracking)
        client = client_for(uri)
        all_tags = {**code_version_tags(), **(tags or {})}
        if parent_run_id:
            fetch_run(client, uri, parent_run_id)  # a missing parent would silently orphan the child
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={k: _clip(str(v), TAG_VALUE_LIMIT) for k, v in all_tags.items()})
        tracker = cls(client, uri, run.info.run_id)
        with tracker._failing_on_error():
            tracker.log_params(params)
            tracker.log_text(config_json, "config.json")
        return tracker

    @classmethod
    def attach(cls, uri: str, run_id: str) -> "Tracker":
        """A tracker on an existing run, leaving its status alone (what unpickling in a Ray worker does)."""
        return cls(client_for(uri), uri, run_id)

    @classmethod
    def resume(cls, uri: str, run_id: str) -> "Tracker":
        """Continue logging to an existing run (e.g. a restarted training job); a terminated run is reopened."""
        client = client_for(uri)
        if fetch_run(client, uri, run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return cls(client, uri, run_id)

    def __reduce__(self):
        return (Tracker.attach, (self.uri, self.run_id))

    # -- logging -------------------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Batch-log params as strings clipped to PARAM_VALUE_LIMIT (the full values live in config.json)."""
        items = [Param(str(k), _clip(_param_text(v), PARAM_VALUE_LIMIT)) for k, v in params.items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=list(batch), synchronous=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric metrics (Python, numpy or 0-d torch scalars) at `step`, e.g. the epoch."""
        stamp, step = _now_ms(), int(step)
        items = []
        for key, value in metrics.items():
            try:
                items.append(Metric(str(key), float(value), stamp, step))
            except (TypeError, ValueError):
                raise TrackingError(f"metric {key}: {value!r} is not a number") from None
        for batch in _chunks(items, METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=list(batch), synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(str(k), _clip(str(v), TAG_VALUE_LIMIT)) for k, v in tags.items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=list(batch), synchronous=True)

    def set_description(self, markdown: str, more: str = "") -> None:
        """The run's description, rendered as Markdown on its Overview page in the UI (MLflow's note tag). Beyond
        TAG_VALUE_LIMIT it ends at the last whole line that fits, then says `more` (where the rest is)."""
        if len(markdown) > TAG_VALUE_LIMIT:
            tail = f"\n\n... {more}".rstrip() + "\n"
            markdown = markdown[:TAG_VALUE_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail
        self.set_tags({NOTE_TAG: markdown})

    def log_figure(self, fig: Any, path: str) -> None:
        """Save a matplotlib figure as the artifact `path` (e.g. 'plots/curve.png')."""
        self._client.log_figure(self.run_id, fig, path)

    def log_dict(self, data: Mapping[str, Any], path: str) -> None:
        self._client.log_dict(self.run_id, dict(data), path)

    def log_text(self, text: str, path: str) -> None:
        self._client.log_text(self.run_id, text, path)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a whole directory."""
        local = Path(local_path)
        if not local.exists():
            raise TrackingError(f"log_artifact: {local} does not exist")
        upload = self._client.log_artifacts if local.is_dir() else self._client.log_artifact
        upload(self.run_id, str(local), artifact_path)

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """Log rows as `<name>.csv` and `<name>.json` (e.g. name='tables/ablation'); columns in first-seen order."""
        folder, _, stem = name.rpartition("/")
        if not stem or not all(isinstance(row, Mapping) for row in rows):
            raise TrackingError(f"log_table {name!r}: needs a file name and rows that are a list of dicts")
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with tempfile.TemporaryDirectory(prefix="raylab-table-") as tmp:
            with open(Path(tmp) / f"{stem}.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            Path(tmp, f"{stem}.json").write_text(json.dumps(list(map(dict, rows)), indent=1, default=str))
            self._client.log_artifacts(self.run_id, tmp, folder or None)

    def log_dataset_lineage(self, manifest_hash: str, name: str, source_path: str | os.PathLike, num_rows: int,
                            context: str = "train", extra: Optional[Mapping[str, Any]] = None) -> None:
        """Record which data set (by content hash) the run consumed with `mlflow.log_input` semantics: an MLflow
        dataset input (the UI's Dataset column; digest = the content hash, profile = rows + `extra`, e.g. the
        generated view's store and scorer), plus tags `dataset.identity` (the latest one logged) and
        `dataset.<name>.*`."""
        if not manifest_hash:
            raise TrackingError(f"log_dataset_lineage: empty manifest_hash for dataset {name!r}")
        extra = {k: str(v) for k, v in (extra or {}).items()}
        self.set_tags({"dataset.identity": manifest_hash, f"dataset.{name}.identity": manifest_hash,
                       f"dataset.{name}.source": str(source_path), f"dataset.{name}.rows": int(num_rows),
                       **{f"dataset.{name}.{k}": v for k, v in extra.items()}})
        entity = Dataset(name=name, digest=manifest_hash[:DIGEST_LIMIT], source_type="local",
                         source=json.dumps({"uri": str(Path(source_path).resolve())}),
                         profile=json.dumps({"num_rows": int(num_rows), "identity": manifest_hash, **extra}))
        tags = [InputTag("mlflow.data.context", context)]
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags)])

    # -- closing -------------------------------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        if status not in END_STATUSES:
            raise TrackingError(f"status: {status!r} is not one of {', '.join(END_STATUSES)}")
        self._client.set_terminated(self.run_id, status=status)
        self.ended = True

    @contextlib.contextmanager
    def _failing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            self._end_after(exc)
            raise

    def _end_after(self, exc: BaseException) -> None:
        """Best effort: a broken store must not hide the exception that ended the run."""
        from raylab.preempt import Preempted  # a stop request: ended on purpose, resumable

        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Preempted)) else "FAILED"
        with contextlib.suppress(Exception):
            self.set_tags({"raylab.error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(Exception):
            self.end(status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._end_after(exc)
        elif not self.ended:  # keep a status the body set explicitly, e.g. end("KILLED")
            self.end("FINISHED")

    def __repr__(self) -> str:
        return f"Tracker(uri={self.uri!r}, run_id={self.run_id!r})"


def fetch_run(client: MlflowClient, uri: str, run_id: str) -> Any:
    """The MlflowClient run, or a one-line TrackingError when the store has no such run."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if _error_code(exc) != RESOURCE_DOES_NOT_EXIST:
            raise
        raise TrackingError(f"run {run_id!r} not found in {uri}") from None
