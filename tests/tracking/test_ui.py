"""`raylab ui`: a real MLflow server on a temp store, checked over HTTP, then stopped with its whole group."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from raylab.config import TrackingConfig
from raylab.tracking.mlflow_store import Tracker, TrackingError, ensure_experiment
from raylab.tracking.ui import serve_ui


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


def _line_matching(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    """The first stdout line of `proc` matching `pattern` (a reader thread: readline alone cannot time out)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen = []
    while True:
        line = lines.get(timeout=timeout_s)
        assert line is not None, f"raylab ui exited with {proc.wait()} before printing its URL:\n{''.join(seen)}"
        seen.append(line)
        if found := re.search(pattern, line):
            return found


def _servers_on(port: int) -> list[int]:
    """Pids of live processes whose command line serves `port` (the MLflow server and its workers)."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and str(port).encode() in args:
            pids.append(int(proc_dir.name))
    return pids


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_ui_on_port_0_serves_the_store_with_nested_runs_and_stops(tcfg, stop):
    """`raylab ui --port 0` as a user runs it: 0 means any free port, never the configured one (held busy here);
    the server shows the store's parent and nested runs, and Ctrl-C or SIGTERM (a service manager, `kill`) stops
    its whole process group: no MLflow server is left behind."""
    with Tracker.start(tcfg, "parent", params={"sweep.name": "s"}, config_json="{}") as parent:
        with Tracker.start(tcfg, "child", params={"train.beta": 6.0}, config_json="{}",
                           parent_run_id=parent.run_id) as child:
            child.log_metrics({"val_pgd5_acc": 0.42}, step=2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        configured = busy.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "raylab", "ui", "--port", "0", "--set",
                                 f"tracking.root={tcfg.root}", "--set", f"tracking.experiment={tcfg.experiment}",
                                 "--set", f"tracking.ui_port={configured}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            found = _line_matching(proc, r"^MLflow UI: (http://127\.0\.0\.1:(\d+)/)\S*workflowType=machine_learning ",
                                   timeout_s=120)
            url, port = found[1], int(found[2])
            assert port not in (0, configured)
            with urllib.request.urlopen(f"{url}health", timeout=10) as resp:
                assert resp.read().strip() == b"OK"
            with urllib.request.urlopen(url, timeout=10) as resp:  # the UI's page itself
                assert resp.status == 200 and b"<html" in resp.read(4096).lower()
            found = _post_json(f"{url}api/2.0/mlflow/runs/search", {"experiment_ids": [ensure_experiment(tcfg)]})
            runs = {r["info"]["run_id"]: r for r in found["runs"]}
            assert set(runs) == {parent.run_id, child.run_id}
            child_data = runs[child.run_id]["data"]
            assert {m["key"]: m["value"] for m in child_data["metrics"]} == {"val_pgd5_acc": 0.42}
            assert _servers_on(port)
            assert {t["key"]: t["value"] for t in child_data["tags"]}["mlflow.parentRunId"] == parent.run_id
        finally:
            proc.send_signal(stop)  # the verb stops the server's process group, then exits
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    assert code == 0 and _group_gone(proc.pid) and not _servers_on(port)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}health", timeout=2)
