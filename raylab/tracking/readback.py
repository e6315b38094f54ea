"""Reading runs back from MLflow as plain data (for `raylab report`, `raylab runs` and tests), so callers need not
import mlflow."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from raylab.tracking.mlflow_store import PARENT_TAG, TrackingError, client_for, fetch_run


@dataclass(frozen=True)
class RunSummary:
    """A run as plain data, so callers need not import mlflow."""
    run_id: str
    name: str
    status: str
    experiment_id: str
    parent_run_id: Optional[str]
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: Optional[int]
    end_time: Optional[int]
    artifact_uri: str

    @classmethod
    def from_run(cls, run: Any) -> "RunSummary":
        info, data = run.info, run.data
        return cls(run_id=info.run_id, name=info.run_name, status=info.status, experiment_id=info.experiment_id,
                   parent_run_id=data.tags.get(PARENT_TAG), params=dict(data.params), metrics=dict(data.metrics),
                   tags=dict(data.tags), start_time=info.start_time, end_time=info.end_time,
                   artifact_uri=info.artifact_uri)


def get_run(uri: str, run_id: str) -> RunSummary:
    return RunSummary.from_run(fetch_run(client_for(uri), uri, run_id))


def get_run_metrics_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order (ties in logging order)."""
    history = client_for(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which metric `key` of a run was logged (what a resumed logger must not log again)."""
    return {m.step for m in client_for(uri).get_metric_history(run_id, key)}


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[RunSummary]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(RunSummary.from_run(r) for r in page)
        token = page.token
        if not token:
            return runs


def find_runs(uri: str, experiment: str, filter: str = "") -> list[RunSummary]:
    """Runs of experiment `experiment` (by name) matching an MLflow filter string, oldest first."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise TrackingError(f"experiment {experiment!r} not found in {uri} (known: {known})")
    return _search(client, [exp.experiment_id], filter)


def download_artifacts(uri: str, run_id: str, path: str, dst: str | os.PathLike) -> Path:
    """Copy a run's artifact file or folder `path` into the local directory `dst` (what `raylab` and tests use
    to get a model back from MLflow alone)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client_for(uri).download_artifacts(run_id, path, str(dst)))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a tqdm bar for every download; a report's small read-backs should not print one."""
    name, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_json_artifact(uri: str, run_id: str, path: str) -> Optional[Any]:
    """A run's JSON artifact file, or None when the run has none at `path` (e.g. a sweep logged by an older raylab)."""
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        try:
            return json.loads(download_artifacts(uri, run_id, path, tmp).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def child_runs(uri: str, parent_run_id: str) -> list[RunSummary]:
    """Runs nested under `parent_run_id` (searched in the parent's experiment), oldest first."""
    client = client_for(uri)
    parent = fetch_run(client, uri, parent_run_id)
    return _search(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
