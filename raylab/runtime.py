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
