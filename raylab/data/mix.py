"""Exact-ratio batches of original and generated images (Wang et al. 2023: ratio 0.3 original, 0.2 above 1M).

Every batch holds round(ratio * B) original and B - round(ratio * B) generated images. Ray's `Dataset.mix`
interleaves whole blocks (one worker got 0% original, another 60%: reference/ray_mlflow.md §2), so two per-worker
streams are zipped instead, each with its own batch size:

- `OriginalStream`: the original training images live in memory; each pass is a seeded permutation split across
  workers, read without replacement; the position survives checkpoints (the reference drew generated images *with*
  replacement and saw only 31% of the originals per epoch: training_recipe.md §4.3).
- `GeneratedStream`: generated rows stream from the shards, pass after pass, never held whole in memory.

The generated part of every batch is a random draw over the whole view (DESIGN.md "Training stream"), like the
reference's uniform sampling over its whole in-memory set. A local shuffle buffer is not enough for that: shards
were laid out class by class, so a 4,096-row buffer over a 1M-row view gave batches that were 92% one class. Each
pass therefore has its own order, a pure function of (seed, pass) and the view:

1. the view's shards (blocks) are permuted, seeded by (seed, pass);
2. consecutive blocks are grouped into windows of at least `window_rows` rows;
3. the rows of each window are permuted, seeded by (seed, pass, window).

Shards themselves are written in random class order (seed plans interleave classes, `import-npz` permutes its
file), so every window is a random draw over the view, and memory is one window, whatever the view's size. Global
batch b of a pass is its rows [b·G, (b+1)·G) with G = world × rows per rank, and rank r takes the r-th slice of
each: ranks are disjoint within a pass, and the order of a pass does not depend on the number of workers (MosaicML
Streaming's elastic determinism), so a run resumed on more or fewer workers sees the same data. Every rank reads
whole windows and keeps its slice: world-fold reading, which is small next to a training step (pyarrow decodes
~477k img/s, bench_shard_read.py).

Both streams are pure Python/numpy/pyarrow; the reader of a pass is passed in (Ray Data in training:
`raylab.train.ingest`; `read_pass_local` here, which runs the same window code in-process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data.shard_format import decode_images

WINDOW_ROWS = 8192  # rows shuffled together: 25 MB of images, whatever the view's size


def split_batch(batch_size: int, ratio: float) -> tuple[int, int]:
    """(original, generated) images per batch."""
    n_orig = int(round(ratio * batch_size))
    return n_orig, batch_size - n_orig


def steps_per_epoch(epoch_length: str, *, batch_size: int, num_original: int, num_generated: int,
                    ratio: float) -> int:
    """Optimizer steps in one epoch.

    "original": the reference's CIFAR-equivalent epoch, ceil(N_original / B) steps whatever the generated set's
    size, N_original being the whole training split as loaded, held-out validation images included (the
    reference's 50,000 for CIFAR: training_recipe.md "How an epoch is defined"; 98 steps at batch 512, not 96).
    "generated": one pass over the generated view.
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


# ---------------------------------------------------------------------------------------------------------------
# What a generated stream draws from, and the order of one pass over it.

@dataclass(frozen=True)
class RowIndex:
    """The rows a generated stream draws from: per shard file, the rows' positions in it and their training labels
    (the view's, which may be pseudo-labels). 6 bytes a row; images stay in the shards."""
    files: tuple[str, ...]
    rows: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not len(self.files) == len(self.rows) == len(self.labels):
            raise ValueError("RowIndex: files, rows and labels must have one entry per shard")
        if any(len(r) != len(l) for r, l in zip(self.rows, self.labels)):
            raise ValueError("RowIndex: every shard needs one label per row")

    @classmethod
    def from_positions(cls, files: Sequence[str], shard: np.ndarray, row: np.ndarray,
                       label: np.ndarray) -> "RowIndex":
        """From per-row (shard index into `files`, row in shard, label); shards with no row are left out."""
        used = np.unique(shard)
        return cls(tuple(str(files[i]) for i in used), tuple(np.asarray(row[shard == i], np.int64) for i in used),
                   tuple(np.asarray(label[shard == i], np.int16) for i in used))

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(r) for r in self.rows], np.int64)

    def subset(self, blocks: Sequence[int]) -> "RowIndex":
        return RowIndex(*(tuple(getattr(self, f)[b] for b in blocks) for f in ("files", "rows", "labels")))


@dataclass(frozen=True)
class Window:
    """Consecutive blocks (shards) of one pass, shuffled together: pass positions [start, start + rows)."""
    number: int
    start: int
    blocks: tuple[int, ...]
    rows: int


def pass_windows(sizes: np.ndarray, seed: int, passes: int, window_rows: int = WINDOW_ROWS) -> list[Window]:
    """The windows of pass `passes`: blocks in a seeded random order, grouped until each holds >= window_rows."""
    windows, blocks, rows, start = [], [], 0, 0
    for b in np.random.default_rng([seed, passes]).permutation(len(sizes)):
        blocks.append(int(b))
        rows += int(sizes[b])
        if rows >= window_rows:
            windows.append(Window(len(windows), start, tuple(blocks), rows))
            blocks, start, rows = [], start + rows, 0
    if blocks:
        windows.append(Window(len(windows), start, tuple(blocks), rows))
    return windows


def window_order(seed: int, passes: int, window: Window) -> np.ndarray:
    return np.random.default_rng([seed, passes, window.number + 1]).permutation(window.rows)


@dataclass(frozen=True)
class PassPlan:
    """What one rank reads of one pass: pass positions [first, end) of `windows`, its slice of each global batch
    (`batch` rows of every `batch * world`)."""
    index: RowIndex
    windows: tuple[Window, ...]
    seed: int
    passes: int
    rank: int
    world: int
    batch: int
    first: int
    end: int

    def keep(self, positions: np.ndarray) -> np.ndarray:
        """Mask of the pass positions this rank reads."""
        mine = (positions % (self.batch * self.world)) // self.batch == self.rank
        return mine & (positions >= self.first) & (positions < self.end)

    def for_window(self, window: Window) -> "PassPlan":
        """The plan of one window alone, its blocks renumbered (what one read task carries: O(window) rows)."""
        local = replace(window, blocks=tuple(range(len(window.blocks))))
        return replace(self, index=self.index.subset(window.blocks), windows=(local,))


def read_window(plan: PassPlan, window: Window) -> pa.Table:
    """This rank's rows of one window (image, seed, label), in pass order: read the blocks, permute, keep the
    slice."""
    parts = []
    for b in window.blocks:
        table = pq.read_table(plan.index.files[b], columns=["image", "seed"]).take(pa.array(plan.index.rows[b]))
        parts.append(table.append_column("label", pa.array(plan.index.labels[b], pa.int16())))
    order = window_order(plan.seed, plan.passes, window)
    take = order[plan.keep(window.start + np.arange(window.rows))]
    return pa.concat_tables(parts).take(pa.array(take)).combine_chunks()


def read_pass_local(plan: PassPlan) -> Iterator[pa.Table]:
    """The pass in this process, window after window (tests, `raylab data mix-stats --local`)."""
    for window in plan.windows:
        one = plan.for_window(window)
        yield read_window(one, one.windows[0])


def rebatch(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Tables of any lengths -> tables of exactly `size` rows (a shorter tail is dropped)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, size).combine_chunks()
            rest = joined.slice(size)
            pending, held = [rest], rest.num_rows


def decode_generated(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow batch with `image` (3072 raw bytes) and `label` columns -> (uint8 NHWC, int64 labels)."""
    labels = np.asarray(batch.column("label").to_numpy(), dtype=np.int64)
    return decode_images(batch.column("image")), labels


PassReader = Callable[[PassPlan], Iterable[pa.Table]]


class GeneratedStream:
    """Fixed-size batches of generated rows for one rank, pass after pass, in the order described above."""

    def __init__(self, index: RowIndex, batch: int, *, seed: int, rank: int = 0, world: int = 1,
                 window_rows: int = WINDOW_ROWS, reader: PassReader = read_pass_local):
        if len(index) < batch * world:
            raise ValueError(f"the generated view has {len(index)} rows, fewer than one batch's {batch * world} "
                             f"({batch} per worker x {world})")
        self.index, self.batch, self.seed, self.rank, self.world = index, batch, seed, rank, world
        self.window_rows, self.reader = window_rows, reader
        self.position = StreamPosition()
        self.last_seeds = np.empty(0, np.int64)  # the `seed` column of the last batch (traces, mix-stats)
        self._it: Iterator[pa.Table] | None = None

    @property
    def batches_per_pass(self) -> int:
        return len(self.index) // (self.batch * self.world)

    def pass_plan(self) -> PassPlan:
        """What this rank reads of the current pass from the current position on (a resume starts mid-pass)."""
        group = self.batch * self.world
        first, end = self.position.offset * group, self.batches_per_pass * group
        windows = tuple(w for w in pass_windows(self.index.sizes, self.seed, self.position.passes, self.window_rows)
                        if w.start + w.rows > first and w.start < end)
        return PassPlan(self.index, windows, self.seed, self.position.passes, self.rank, self.world, self.batch,
                        first, end)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position.offset >= self.batches_per_pass:
            self.position, self._it = StreamPosition(self.position.passes + 1, 0), None
        if self._it is None:
            self._it = rebatch(self.reader(self.pass_plan()), self.batch)
        batch = next(self._it, None)
        if batch is None:
            raise RuntimeError(f"pass {self.position.passes} of the generated view ended after "
                               f"{self.position.offset} of {self.batches_per_pass} batches (a shard changed?)")
        self.position.offset += 1
        self.last_seeds = batch.column("seed").to_numpy()
        return decode_generated(batch)

    def state_dict(self) -> dict:
        return {"passes": self.position.passes, "offset": self.position.offset}

    def load_state_dict(self, state: dict) -> None:
        self.position = StreamPosition(int(state["passes"]), int(state["offset"]))
        self._it = None


# ---------------------------------------------------------------------------------------------------------------
# How random the generated part of the batches is (`raylab data mix-stats`).

@dataclass(frozen=True)
class MixStats:
    """Class histograms of the generated part of `counts.shape[0]` batches, against the view's class mix."""
    counts: np.ndarray    # [batches, classes]
    expected: np.ndarray  # [classes], the view's class shares
    uniform_max: float    # mean max class share of batches drawn uniformly at random from the view

    @property
    def max_share(self) -> np.ndarray:
        return self.counts.max(1) / self.counts.sum(1)

    def p_values(self) -> np.ndarray:
        """Chi-square p-value of each batch's class counts against the view's class shares."""
        from scipy.stats import chisquare

        present = self.expected > 0
        n = self.counts.sum(1, keepdims=True)
        return np.array([chisquare(c[present], e[present]).pvalue
                         for c, e in zip(self.counts, n * self.expected[None, :])])

    def summary(self) -> str:
        m = self.max_share
        return (f"max class share: mean {m.mean():.1%}, worst {m.max():.1%} over {len(m)} batches "
                f"(uniform would be {self.uniform_max:.1%})")


def uniform_max_share(expected: np.ndarray, batch: int, draws: int = 4000) -> float:
    """Mean max class share of `batch` rows drawn at random with class shares `expected` (Monte Carlo, a fixed
    generator: an estimate, not a result)."""
    counts = np.random.default_rng(0).multinomial(batch, expected / expected.sum(), size=draws)
    return float((counts.max(1) / batch).mean())


def mix_stats(label_batches: Sequence[np.ndarray], index: RowIndex) -> MixStats:
    labels = np.concatenate(index.labels).astype(np.int64)
    classes = int(labels.max()) + 1
    expected = np.bincount(labels, minlength=classes) / len(labels)
    counts = np.stack([np.bincount(b, minlength=classes) for b in label_batches])
    return MixStats(counts, expected, uniform_max_share(expected, int(counts[0].sum())))
