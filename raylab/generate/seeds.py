"""Seed-addressed noise: every image owns a torch.Generator, so its bytes depend only on (dataset seed, class, i).

Batch size, chunking, the number of Ray actors and retries then cannot change an image (EDM's
`StackedRandomGenerator` idea, edm.md §1 "Seeds"). Each image's generator first draws its latent and then, if the
sampler churns, its per-step noise, in that order.

Seed plan (`image_seed`): the first 8 bytes of BLAKE2b(b"raylab/edm-seed/v1:<dataset_seed>:<class>:<index>"),
little-endian, masked to 63 bits (so it fits an int64 Parquet column and `Generator.manual_seed`).
- "disjoint" (default): the class is part of the key, so every (class, i) starts from its own latent.
- "shared": the class is replaced by "*", so image i of every class starts from the same latent, which is what
  Wang et al. 2023 do (they reuse seeds 0…499999 for every class, edm.md §1).
Unconditional sets use class −1. Generators are CPU by default: CUDA and CPU generators differ for the same seed.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from raylab.generate.sampler import edm_sample, to_uint8

SEED_MODES = ("disjoint", "shared")
_SEED_MASK = (1 << 63) - 1


class SeedError(ValueError):
    """A one-line message naming the bad seed argument and what is allowed."""


def _check_int(what: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise SeedError(f"{what}: {value!r} must be an int >= {lo}")
    return int(value)


def image_seed(dataset_seed: int, class_idx: int, index: int, mode: str = "disjoint") -> int:
    """The 63-bit seed of image `index` of class `class_idx` (−1 = unconditional) in dataset `dataset_seed`."""
    if mode not in SEED_MODES:
        raise SeedError(f"seed mode: {mode!r} is not one of {', '.join(SEED_MODES)}")
    dataset_seed, index = _check_int("dataset seed", dataset_seed, 0), _check_int("image index", index, 0)
    cls = "*" if mode == "shared" else str(_check_int("class index", class_idx, -1))
    digest = hashlib.blake2b(f"raylab/edm-seed/v1:{dataset_seed}:{cls}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def image_seeds(dataset_seed: int, class_idx: int, indices: Sequence[int], mode: str = "disjoint") -> list[int]:
    return [image_seed(dataset_seed, class_idx, i, mode) for i in indices]


class PerImageNoise:
    """One generator per image: `randn(shape)` stacks one draw per image; as `noise_fn(x)` it returns noise
    shaped like x on x's device (drawn on the generators' device, then moved)."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(_check_int("seed", s, 0)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self):
            raise SeedError(f"noise_fn: batch of {like.shape[0]} images but {len(self)} generators")
        # Drawn in x's dtype (float64 in the sampler), as the reference's randn_like does.
        return self.randn(like.shape[1:], dtype=like.dtype).to(like.device)


def latents(seeds: Sequence[int], shape: Sequence[int] = (3, 32, 32),
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit normal latents [len(seeds), *shape], image k drawn from its own generator seeded by seeds[k]."""
    return PerImageNoise(seeds, device).randn(shape)


def one_hot(labels: Sequence[int], label_dim: int, device: str | torch.device = "cpu") -> Optional[torch.Tensor]:
    """One-hot float rows for a conditional net; None when label_dim is 0 (labels must then be −1)."""
    labels = np.asarray(labels, dtype=np.int64)
    allowed = (0, label_dim - 1) if label_dim else (-1, -1)
    if labels.size and (labels.min() < allowed[0] or labels.max() > allowed[1]):
        raise SeedError(f"labels: values must be in [{allowed[0]}, {allowed[1]}] for label_dim={label_dim}")
    if not label_dim:
        return None
    return torch.eye(label_dim, device=device)[torch.as_tensor(labels, device=device)]


def _generate_batch(net: nn.Module, seeds: Sequence[int], labels: np.ndarray, kwargs: Mapping[str, Any],
                    device: torch.device, latents_on_cpu: bool) -> np.ndarray:
    n = len(seeds)
    if n == 1:  # oneDNN convolves a lone image by another kernel (low bits differ): sample it as a pair
        seeds, labels = [seeds[0]] * 2, np.repeat(labels, 2)
    noise = PerImageNoise(seeds, "cpu" if latents_on_cpu else device)
    z = noise.randn((net.img_channels, net.img_resolution, net.img_resolution)).to(device)
    x = edm_sample(net, z, one_hot(labels, net.label_dim, device), noise_fn=noise, **kwargs)
    return to_uint8(x[:n]).numpy()


def generate_images(net: nn.Module, seeds: Sequence[int], labels: Optional[Sequence[int]],
                    sample_kwargs: Mapping[str, Any], device: str | torch.device = "cpu",
                    latents_on_cpu: bool = True, batch_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], int64 labels [N]) for `seeds`; labels are class indices (None or −1s for an
    unconditional net). Images are sampled `batch_size` at a time (None = all at once); the bytes do not depend
    on it on a given device (see module docstring)."""
    labels = np.full(len(seeds), -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(seeds),):
        raise SeedError(f"labels: {labels.shape[0] if labels.ndim else 0} labels for {len(seeds)} seeds")
    one_hot(labels, net.label_dim)  # validate before any compute
    step = len(seeds) if batch_size is None else _check_int("batch_size", batch_size, 1)
    device = torch.device(device)
    chunks = [_generate_batch(net, seeds[i:i + step], labels[i:i + step], sample_kwargs, device, latents_on_cpu)
              for i in range(0, len(seeds), max(step, 1))]
    shape = (0, net.img_resolution, net.img_resolution, net.img_channels)
    return (np.concatenate(chunks) if chunks else np.zeros(shape, np.uint8)), labels
