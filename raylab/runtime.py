"""Process-level helpers with single-process defaults: device choice, seeding, rank-0 printing."""
from __future__ import annotations

import os
import random

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


def world_rank() -> int:
    """Rank of this process under torch.distributed, 0 when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs) -> None:
    if world_rank() == 0:
        print(*args, **kwargs, flush=True)
