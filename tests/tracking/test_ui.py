"""`raylab ui`: a real MLflow server on a temp store, checked over HTTP, then stopped with its whole group."""
import json
import os
import socket
import urllib.request

import pytest

from raylab.config import TrackingConfig
from raylab.tracking.mlflow_store import Tracker, TrackingError, ensure_experiment
from raylab.tracking.ui import serve_ui, stop_ui


@pytest.fixture()
def tcfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingConfig(root=str(tmp_path), experiment="ui")


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_ui_serves_nested_runs_and_stops(tcfg):
    with Tracker.start(tcfg, "parent", params={"sweep.name": "s"}, config_json="{}") as parent:
        with Tracker.start(tcfg, "child", params={"train.beta": 6.0}, config_json="{}",
                           parent_run_id=parent.run_id) as child:
            child.log_metrics({"val_robust_acc": 0.42}, step=2)
    url, proc = serve_ui(tcfg, port=0, block=False, timeout_s=180)  # generous: shared 2-core CI boxes
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            assert resp.read().strip() == b"OK"
        found = _post_json(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [ensure_experiment(tcfg)]})
        runs = {r["info"]["run_id"]: r for r in found["runs"]}
        assert set(runs) == {parent.run_id, child.run_id}
        child_data = runs[child.run_id]["data"]
        assert {m["key"]: m["value"] for m in child_data["metrics"]} == {"val_robust_acc": 0.42}
        assert {t["key"]: t["value"] for t in child_data["tags"]}["mlflow.parentRunId"] == parent.run_id
    finally:
        stop_ui(proc)
    assert proc.poll() is not None and _group_gone(proc.pid)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_ui_refuses_busy_port_and_remote_store(tcfg, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TrackingError, match=f"port {port} .* in use"):
            serve_ui(tcfg, port=port, block=False)
    remote = TrackingConfig(root=str(tmp_path), uri="http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="already a server"):
        serve_ui(remote, block=False)
