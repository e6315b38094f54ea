"""Run on the head (`python -m raylab.rehearse.probe NODES TIMEOUT MLFLOW_URL`): wait until NODES Ray nodes are
alive and the MLflow server answers, then print `ready`; exit 1 with one line at TIMEOUT seconds."""
from __future__ import annotations

import sys
import time
import urllib.request


def mlflow_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def alive_nodes() -> int:
    import ray

    return sum(bool(n.get("Alive")) for n in ray.nodes())


def wait_ready(count: int, timeout: float, url: str) -> str:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not ray.is_initialized():
                ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
            if alive_nodes() >= count and mlflow_up(url):
                return ""
        except (ConnectionError, RuntimeError):
            pass
        time.sleep(1.0)
    seen = alive_nodes() if ray.is_initialized() else 0
    return f"{seen} of {count} Ray nodes alive, MLflow {'up' if mlflow_up(url) else 'down'} after {timeout:.0f} s"


if __name__ == "__main__":
    problem = wait_ready(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
    print(problem or "ready", flush=True)
    sys.exit(1 if problem else 0)
