"""The code runs unchanged against a cluster address: a real local Ray cluster (`ray start --head` on loopback, in
a temp dir) gets a smoke sweep through `ray job submit`; the test stops the cluster it started."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture()
def local_cluster():
    # A short temp dir: Ray's Unix socket paths under pytest's long tmp_path exceed the 107-byte limit.
    temp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # Every port of its own: the test session's Ray already holds the defaults (agent 52365 among them), and a
    # head whose job agent cannot bind answers "No available agent to submit job" forever (CI, session 1).
    ports = [f"--{flag}={free_port()}" for flag in PORT_FLAGS]
    head = subprocess.Popen(
        [ray_cli(), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--resources={\"trial_driver\": 4}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([ray_cli(), "job", "list", "--address", address], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the local Ray head did not answer on its dashboard port within 120 s")
    yield address, env, temp
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a graceful stop took 34 s in the suite; the cluster is disposable
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def agent_log(cluster) -> str:
    """The tail of the head's dashboard-agent log, for a failure message."""
    logs = sorted(Path(cluster[2]).glob("session_*/logs/dashboard_agent.log"))
    return "\n--- dashboard_agent.log ---\n" + logs[-1].read_text()[-2000:] if logs else ""


@pytest.mark.slow
def test_smoke_sweep_runs_through_ray_job_submit(local_cluster, tmp_path):
    address, env, _ = local_cluster
    root = tmp_path / "runs"
    command = [ray_cli(), "job", "submit", "--address", address, "--", sys.executable,
               str(REPO / "experiments" / "ablate_ratio.py"), "--smoke", "--values", "1.0",
               "--set", f"tracking.root={root}", "--set", "eval.autoattack=none"]
    # ratio 1: a whole trial (train, clean + PGD eval, MLflow), no generation; AutoAttack has its own tests
    for _ in range(30):  # the job agent comes up a little after the dashboard answers
        proc = subprocess.run(command, env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + agent_log(local_cluster)
    assert "succeeded" in proc.stdout and "sweep ratio-" in proc.stdout
    assert (root / "mlflow.db").exists()
