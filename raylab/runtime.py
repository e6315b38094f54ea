"""Process-level helpers with single-process defaults: device choice, seeding, torch thread count, GPU numerics."""
from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def gpu_backends(tf32: bool, deterministic: bool = False) -> Iterator[None]:
    """The process's GPU numerics, set explicitly for the duration (previous values restored after: local mode and
    the local eval engine run in the driver), by the train worker and the eval actors alike.

    - TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN), both ways at once: PyTorch's own defaults differ
      (cuDNN on since 1.7, so the papers' A100 runs had it; cuBLAS off since 1.12), so "fp32" meant a mix.
    - cudnn.benchmark: autotune each convolution shape once (the reference turns it on); off when deterministic.
    - deterministic: torch.use_deterministic_algorithms (an op without a deterministic CUDA kernel raises at its
      first call) and cudnn.deterministic, so a resumed run repeats the uninterrupted one bit for bit on the same
      GPU and software. cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first call.
    None of it changes CPU arithmetic."""
    precision = "tf32" if tf32 else "ieee"
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not deterministic, deterministic
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        matmul, conv, benchmark, cudnn_det, det, warn_only = saved
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_det
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
