"""Connecting to Ray: a cluster when one is named, else a local instance sized to work on small machines.

On a 2-core laptop Ray Data actor pools and Train+ingest can deadlock silently at 2 logical CPUs
(reference/ray_mlflow.md §2), so a local instance gets at least 4 logical CPUs (oversubscription is harmless).
The custom `trial_driver` resource lets Tune trial drivers run without holding a CPU (§3).
"""
from __future__ import annotations

import os

MIN_LOCAL_CPUS = 4


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray; a no-op when Ray is already initialized."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs: no token files, no warning per init
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    cpus = max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, resources={"trial_driver": cpus}, include_dashboard=False, **kwargs)
