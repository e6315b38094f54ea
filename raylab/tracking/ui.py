"""`raylab ui`: the MLflow server (UI + REST API) on the run root's store.

It runs `python -m mlflow server` in its own process group, bound to 127.0.0.1 unless told otherwise: MLflow 3's
server also checks Host headers and CORS, so exposing it beyond the machine needs `--allowed-hosts` as well
(reference/ray_mlflow.md §6). Artifacts of experiments the server itself creates are proxied into
`<root>/mlartifacts`, the same folder `ensure_experiment` points local experiments at.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from raylab.config import TrackingConfig
from raylab.tracking.mlflow_store import TrackingError, is_remote_uri, artifact_root, client_for, resolve_tracking_uri
from raylab.tracking.views import SweepView, publish, run_link, sweep_view

HEALTH_TIMEOUT_S = 60.0   # measured: /health answers after ~5-8 s on 2 cores


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ui_command(backend_uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1"]


def _log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `<url>/health` until it answers OK; fail early if the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with code {proc.returncode} before answering {url}/health;"
                                f" log {log}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop_ui(proc)
    raise TrackingError(f"mlflow server did not answer {url}/health within {timeout_s:.0f} s; log {log}:\n"
                        f"{_log_tail(log)}")


def serve_ui(cfg_tracking: TrackingConfig, port: Optional[int] = None, host: str = "127.0.0.1", block: bool = True,
             timeout_s: float = HEALTH_TIMEOUT_S, sweep: Optional[str] = None) -> tuple[str, subprocess.Popen]:
    """Start the MLflow server on the configured store and wait until it is healthy; print the URL of the view of
    `sweep` (default: the newest sweep; raylab.tracking.views), its charts and its parent run.

    port: None = `tracking.ui_port`, 0 = any free port. block=True serves until Ctrl-C (then stops the server);
    block=False returns at once with the running process (stop it with `stop_ui`).
    """
    uri = resolve_tracking_uri(cfg_tracking)
    if is_remote_uri(uri):
        raise TrackingError(f"tracking uri {uri} is already a server; open it in a browser instead")
    view = _sweep_view(uri, cfg_tracking, sweep)  # an unknown --sweep stops here, before the server starts
    port = cfg_tracking.ui_port if port is None else port
    port = free_port(host) if port == 0 else port
    if not _port_free(host, port):
        raise TrackingError(f"ui port {port} on {host} is in use; pass another port (tracking.ui_port)")
    client_for(uri)  # create/migrate the store here, under the lock, not racing the server's own migration
    artifacts = artifact_root(cfg_tracking)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = Path(cfg_tracking.root).resolve() / "logs" / f"mlflow-ui-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Server-side jobs (huey workers for GenAI features) are unused by raylab; off means fewer processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    with open(log, "ab") as out:
        proc = subprocess.Popen(ui_command(uri, artifacts, host, port), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    _wait_healthy(url, proc, log, timeout_s)
    print("\n".join(ui_lines(url, uri, cfg_tracking, view, log)), flush=True)
    if block:
        _serve_until_interrupted(proc)
    return url, proc


def _sweep_view(uri: str, cfg_tracking: TrackingConfig, sweep: Optional[str]) -> Optional[SweepView]:
    try:
        return sweep_view(uri, cfg_tracking.experiment, sweep)
    except TrackingError:
        if sweep:
            raise
        return None  # no experiment yet: the server still shows the store


def ui_lines(url: str, uri: str, cfg_tracking: TrackingConfig, view: Optional[SweepView], log: Path) -> list[str]:
    """What `raylab ui` prints: the URL of the sweep's runs, of their charts and of its parent run. MLflow 3 opens
    an experiment on its GenAI pages unless the URL asks for the machine learning workflow (its `workflowType` query;
    the experiment also carries the model-training kind tag)."""
    ml = "workflowType=machine_learning"
    if view is None:
        experiment = client_for(uri).get_experiment_by_name(cfg_tracking.experiment)
        where = f"#/experiments/{experiment.experiment_id}/runs" if experiment is not None else "#/experiments"
        return [f"MLflow UI: {url}/{where}?{ml}  (store {uri}; log {log})"]
    page = f"{url}/#/experiments/{view.experiment_id}/runs?{ml}&viewStateShareKey={publish(uri, view)}"
    return [f"MLflow UI: {page}  (store {uri}; log {log})",
            f"  sweep {view.sweep}, its trials' metrics against {', '.join(view.knobs)}: {page}&compareRunsMode=CHART",
            f"  its report (table, figures, each arm's metrics): "
            f"{url}/{run_link(view.experiment_id, view.parent_run_id)}?{ml}"]


def _serve_until_interrupted(proc: subprocess.Popen) -> None:
    """Serve until Ctrl-C or SIGTERM (a service manager, `kill`): either stops the server's whole process group,
    so no MLflow server outlives `raylab ui`."""
    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(proc)
        signal.signal(signal.SIGTERM, previous)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_ui(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop the server and its worker processes (the whole process group): SIGTERM, then SIGKILL."""
    pgid = proc.pid  # start_new_session=True made the server its own group leader
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pgid):
            proc.poll()  # reap the leader so it does not linger as a zombie
            time.sleep(0.1)
    proc.wait(timeout=timeout_s)
