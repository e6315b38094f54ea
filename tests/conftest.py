"""Test-wide setup: one local Ray for the whole run, quiet and fast (reference/ray_mlflow.md §5)."""
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# One OpenMP thread per process: Ray workers and the test process share 2 cores, and oversubscribed OpenMP
# spin-waits made a tiny forward 50-100x slower here (1.2 s vs 0.03 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Torch in the test process uses one intra-op thread (see OMP_NUM_THREADS above)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test run: 4 logical CPUs on 2 cores (Data/Train deadlock at 2)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False, log_to_driver=False,
                 resources={"trial_driver": 4})
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store in a temp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
