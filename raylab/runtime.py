"""Process-level helpers with single-process defaults: device choice, seeding, torch thread count."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def pick_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present; the CPU otherwise (every path is device-agnostic)."""
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("resources.use_gpu=true but no CUDA device is visible")
    return torch.device("cuda" if use_gpu else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's global random streams (Python, numpy, torch CPU) as tensors and ints: a checkpoint loads it
    with torch.load(weights_only=True), which refuses numpy arrays."""
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy_key": torch.from_numpy(key.astype(np.int64)),
            "numpy_rest": [int(pos), int(has_gauss), float(cached)], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` intra-op threads, then restore the previous count. Ray gives each worker as many threads as
    CPUs (OMP_NUM_THREADS); local mode (num_workers=0) trains inside the driver, so it gets the same here. It
    matters: on a loaded 2-core machine, 2 threads trained 6x slower than 1 (OpenMP spin-waits when oversubscribed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(int(count), 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
