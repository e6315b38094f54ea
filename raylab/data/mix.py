"""Exact-ratio batches of original and generated images (Wang et al. 2023: ratio 0.3 original, 0.2 above 1M).

Every batch holds round(ratio * B) original and B - round(ratio * B) generated images. Ray's `Dataset.mix`
interleaves whole blocks (one worker got 0% original, another 60%: reference/ray_mlflow.md §2), so two per-worker
streams are zipped instead, each with its own batch size:

- `OriginalStream`: the original training images live in memory; each pass is a seeded permutation split across
  workers, read without replacement; the position survives checkpoints (the reference drew generated images *with*
  replacement and saw only 31% of the originals per epoch: training_recipe.md §4.3).
- `GeneratedStream`: generated rows stream from a Ray Data shard iterator (anything with `iter_batches`), one pass
  after another, never held whole in memory; each pass reshuffles through a seeded local shuffle buffer and the
  position (pass, batches into the pass) is checkpointed so a resumed run skips what it already consumed.

Both are pure Python/numpy: Ray hands them an iterator, tests hand them a list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

from raylab.data.shard_format import decode_images


def split_batch(batch_size: int, ratio: float) -> tuple[int, int]:
    """(original, generated) images per batch."""
    n_orig = int(round(ratio * batch_size))
    return n_orig, batch_size - n_orig


def steps_per_epoch(epoch_length: str, *, batch_size: int, num_original: int, num_generated: int,
                    ratio: float) -> int:
    """Optimizer steps in one epoch.

    "original": the reference's CIFAR-equivalent epoch, ceil(N_original / B) steps whatever the generated set's
    size (training_recipe.md "How an epoch is defined"). "generated": one pass over the generated view.
    """
    if epoch_length == "original" or ratio >= 1.0:
        return max(1, math.ceil(num_original / batch_size))
    _, n_gen = split_batch(batch_size, ratio)
    steps = num_generated // n_gen
    if steps < 1:
        raise ValueError(f"train.epoch_length=generated: {num_generated} generated rows are fewer than one "
                         f"batch's {n_gen}")
    return steps


@dataclass
class StreamPosition:
    """Where a stream is: which pass, and how many batches (or items) into it."""
    passes: int = 0
    offset: int = 0


class OriginalStream:
    """Batches of original image indices for one worker: seeded permutation per pass, no replacement in a pass."""

    def __init__(self, num_items: int, batch: int, *, seed: int, rank: int = 0, world: int = 1):
        if num_items < world:
            raise ValueError(f"{num_items} original images cannot be split over {world} workers")
        self.num_items, self.batch, self.seed, self.rank, self.world = num_items, batch, seed, rank, world
        self.position = StreamPosition()
        self._order = self._pass_order(0)

    def _pass_order(self, passes: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, passes]).permutation(self.num_items)
        usable = len(perm) - len(perm) % self.world  # equal share per worker keeps the ranks in lockstep
        return perm[:usable][self.rank::self.world]

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch
        while need:
            take = self._order[self.position.offset:self.position.offset + need]
            out.append(take)
            need -= len(take)
            self.position.offset += len(take)
            if self.position.offset >= len(self._order):
                self.position = StreamPosition(self.position.passes + 1, 0)
                self._order = self._pass_order(self.position.passes)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"passes": self.position.passes, "offset": self.position.offset}

    def load_state_dict(self, state: dict) -> None:
        self.position = StreamPosition(int(state["passes"]), int(state["offset"]))
        self._order = self._pass_order(self.position.passes)


class BatchSource(Protocol):
    def iter_batches(self, **kwargs: Any) -> Iterator[Any]: ...


def decode_generated(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow batch with `image` (3072 raw bytes) and `label` columns -> (uint8 NHWC, int64 labels)."""
    labels = np.asarray(batch.column("label").to_numpy(), dtype=np.int64)
    return decode_images(batch.column("image")), labels


class GeneratedStream:
    """Fixed-size batches of generated rows, pass after pass, from a Ray Data shard iterator."""

    def __init__(self, source: BatchSource, batch: int, *, seed: int, shuffle_buffer: int = 4096):
        self.source, self.batch, self.seed, self.shuffle_buffer = source, batch, seed, shuffle_buffer
        self.position = StreamPosition()
        self._it: Iterator[Any] | None = None

    def _open_pass(self) -> Iterator[Any]:
        it = iter(self.source.iter_batches(
            batch_size=self.batch, drop_last=True, batch_format="pyarrow",
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=(self.seed * 1_000_003 + self.position.passes) % 2**31 if self.shuffle_buffer else None))
        for _ in range(self.position.offset):  # resume: skip what the checkpointed run already consumed
            next(it)
        return it

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(2):
            if self._it is None:
                self._it = self._open_pass()
            batch = next(self._it, None)
            if batch is not None:
                self.position.offset += 1
                return decode_generated(batch)
            self._it = None
            self.position = StreamPosition(self.position.passes + 1, 0)
        raise ValueError(f"the generated view yields fewer than {self.batch} rows per worker")

    def state_dict(self) -> dict:
        return {"passes": self.position.passes, "offset": self.position.offset}

    def load_state_dict(self, state: dict) -> None:
        self.position = StreamPosition(int(state["passes"]), int(state["offset"]))
        self._it = None
