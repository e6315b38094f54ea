"""The seed plan of a generated set: which image every plan index is, and which shard holds it. Pure.

A plan lays the images of a set out on one integer axis, the `seed` column of the shards (DESIGN.md "Seeds"):

    conditional:    plan index i = j * K + class   (image j of class `class`, classes 0..K-1)
    unconditional:  plan index i = j, j < K * per_class     (class_cond −1; the same image budget as conditional)

Classes are interleaved, not laid out one after another: every shard, and every run of K consecutive rows, holds
all classes equally, so a reader of consecutive rows never sees one class for thousands of steps (a class-major
plan made the training batches of a 1M-image set 92% one class: `raylab.data.mix`).

Image i's own RNG seed is `image_seed(generate.seed, class, j, generate.seed_mode)`, so its bytes depend on
(dataset seed, class, j) only. The axis is cut into fixed ranges of `generate.shard_size` indices, one Parquet
shard each, so a shard's name says which images it holds whatever the actor count, and resuming a job means
writing the ranges that are still missing.

The identity of a generated set (`set_identity`) is everything its bytes depend on: the generator's content hash,
the sampler settings, this plan and the scorer. Batch size, actor count and retries are deliberately absent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from raylab.config import GenerateConfig
from raylab.generate.seeds import SEED_MODES, image_seed

MAX_PLAN_SIZE = 10**10  # shard file names hold 10-digit plan indices (raylab.data.shards)
IDENTITY_FORMAT = "raylab-generated/2"  # /2: classes interleaved in the plan (/1 laid them out class by class)


class PlanError(ValueError):
    """A one-line message naming the plan setting at fault and what is allowed."""


@dataclass(frozen=True)
class PlanRows:
    """The images of one seed range: plan index, conditioning class (−1 = unconditional), per-image RNG seed."""
    index: np.ndarray       # int64 [n], the `seed` column
    class_cond: np.ndarray  # int16 [n]
    rng_seeds: list[int]    # 63-bit seeds for raylab.generate.seeds


@dataclass(frozen=True)
class SeedPlan:
    classes: tuple[int, ...]  # conditioning classes in plan order; (-1,) for an unconditional set
    per_class: int            # images per entry of `classes`
    dataset_seed: int
    seed_mode: str
    shard_size: int

    def __post_init__(self) -> None:
        if not self.classes or (self.classes != (-1,) and list(self.classes) != list(range(len(self.classes)))):
            raise PlanError(f"plan classes: {self.classes} must be 0..K-1 (conditional) or (-1,) (unconditional)")
        for name in ("per_class", "shard_size"):
            if getattr(self, name) < 1:
                raise PlanError(f"generate.{name}: {getattr(self, name)} must be >= 1")
        if self.seed_mode not in SEED_MODES:
            raise PlanError(f"generate.seed_mode: {self.seed_mode!r} is not one of {', '.join(SEED_MODES)}")
        if self.size > MAX_PLAN_SIZE:
            raise PlanError(f"plan size {self.size} exceeds {MAX_PLAN_SIZE} images (10-digit shard names)")

    @classmethod
    def from_config(cls, gen: GenerateConfig, num_classes: int, conditional: bool = True) -> "SeedPlan":
        """The plan of `gen` for a dataset of `num_classes` classes. An unconditional set gets the same total
        budget, K * per_class images (Wang et al. 2023 App. A: 5M unconditional images for CIFAR-10 = 500K per
        class)."""
        if num_classes < 1:
            raise PlanError(f"num_classes: {num_classes} must be >= 1")
        classes = tuple(range(num_classes)) if conditional else (-1,)
        per_class = gen.per_class if conditional else gen.per_class * num_classes
        return cls(classes, per_class, gen.seed, gen.seed_mode, gen.shard_size)

    @property
    def conditional(self) -> bool:
        return self.classes != (-1,)

    @property
    def size(self) -> int:
        return len(self.classes) * self.per_class

    def shards(self) -> list[tuple[int, int]]:
        """Every shard's (first, last) plan index, inclusive; the last shard may be shorter."""
        return [(a, min(a + self.shard_size, self.size) - 1) for a in range(0, self.size, self.shard_size)]

    def shard_of(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) of the shard holding each plan index."""
        index = self._check_index(index)
        first = index // self.shard_size * self.shard_size
        return first, np.minimum(first + self.shard_size, self.size) - 1

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class_cond, j) of each plan index: conditioning class (−1 unconditional) and index within it."""
        index = self._check_index(index)
        j, pos = np.divmod(index, len(self.classes))
        return np.asarray(self.classes, np.int64)[pos], j

    def rows(self, first: int, last: int) -> PlanRows:
        """The images of plan indices first..last (inclusive)."""
        if not 0 <= first <= last < self.size:
            raise PlanError(f"seed range ({first}, {last}) outside the plan's 0..{self.size - 1}")
        index = np.arange(first, last + 1, dtype=np.int64)
        cls, j = self.locate(index)
        seeds = [image_seed(self.dataset_seed, int(c), int(k), self.seed_mode) for c, k in zip(cls, j)]
        return PlanRows(index, cls.astype(np.int16), seeds)

    def first_of_class(self, class_cond: int, count: int) -> np.ndarray:
        """Plan indices of the first `count` images of a class (of the whole set when unconditional)."""
        pos = self.classes.index(class_cond)
        return pos + len(self.classes) * np.arange(min(count, self.per_class), dtype=np.int64)

    def identity(self) -> dict[str, Any]:
        return asdict(self) | {"classes": list(self.classes), "size": self.size, "layout": "class-interleaved"}

    def _check_index(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.size):
            raise PlanError(f"plan index outside 0..{self.size - 1}: [{index.min()}, {index.max()}]")
        return index


# ---------------------------------------------------------------------------------------------------------------
# Identity of a generated set.

def _json_number(value: Any) -> Any:
    """Non-finite floats as strings: the store identity is strict JSON (s_max defaults to inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def sampler_identity(gen: GenerateConfig) -> dict[str, Any]:
    """The sampler settings the bytes depend on (not batch_size: images are seeded per image)."""
    keys = ("steps", "solver", "sigma_min", "sigma_max", "rho", "s_churn", "s_min", "s_max", "s_noise",
            "latents_on_cpu")
    return {k: _json_number(getattr(gen, k)) for k in keys}


def set_identity(generator: dict[str, Any], sampler: Optional[dict[str, Any]], plan: SeedPlan,
                 scorer: Optional[dict[str, Any]]) -> dict[str, Any]:
    """{generator content hash, sampler config, seed plan, scorer identity}: what the manifest records."""
    return {"format": IDENTITY_FORMAT, "generator": generator, "sampler": sampler, "plan": plan.identity(),
            "scorer": scorer}
