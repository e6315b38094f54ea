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
pass therefore has its own order, a pure function of (seed, pass) and the view's row index
(`raylab.data.row_index`, whose blocks are the shards' Parquet row groups):

1. the view's blocks are permuted, seeded by (seed, pass);
2. consecutive blocks are grouped into windows of at least `window_rows` rows;
3. each block's rows are permuted, seeded by (seed, pass, window): the window's *storage order*;
4. the window's pass order sorts storage positions s by u + s * PHI mod 1 (u seeded likewise): every run of
   consecutive pass positions takes its rows evenly spread over the window's storage, so over all its blocks.

Global batch b of a pass is its positions [b·G, (b+1)·G) with G = world × rows per rank: the same rows for any
number of workers (MosaicML Streaming's elastic determinism: a run resumed on more or fewer workers sees the same
data). Within a global batch the ranks split by storage order (`rank_share`): rank r takes the r-th world-quantile
of the batch's rows in each window, exactly G / world rows over the batch, so across a window it takes the rows of
its own consecutive blocks and reads only their row groups, not the whole window (each rank read every window whole
and kept 1/world before: world x the view's bytes per pass, from one NFS export). MosaicML assigns shards to nodes
for the same reason, but fixes the order for one count of "canonical nodes"; here the order is the same for every
world. What a rank reads beyond its rows is, per window, about one row group at each edge of its quantile plus the
spread of a batch (W / G rows): reads / rows ~ 1 + world x (ROW_GROUP_ROWS + W / G) / W, under 2x up to 128 ranks
at WINDOW_ROWS and the paper's batch (2.07x at 256, 3.1x at 512: a larger world needs a larger window). A view that keeps a small fraction of its store's rows is read from a compact copy of its rows
(`raylab.pipeline.compact`), or each row group read would hold few of its rows.

Shards themselves are written in random class order (seed plans interleave classes, `import-npz` deals runs of
rows across shards), and memory is one window's share, whatever the view's size.

Both streams are pure Python/numpy/pyarrow; the reader of a pass is passed in (Ray Data in training:
`raylab.train.ingest`; `read_pass_local` here, which runs the same window code in-process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from raylab.data.row_index import RowIndex
from raylab.data.shard_format import IMAGE_TYPE, decode_images
from raylab.data.shards import read_parquet

# Rows mixed together: 200 MB of images, all ranks together. A rank reads the row groups of 1/world of a window
# plus about one row group at each edge: at 32,768 rows, 2.0x its rows at 128 ranks of 12 (1.5x at 64); at 65,536,
# 1.6x at 128 and 1.3x at 64 (tests/data/test_at_scale.py). The window must not depend on the world (the order of a
# pass is a function of (seed, pass)), so it is sized for the largest world we run: under 2x up to 128 ranks (the
# whole store at 2M rows, 1,638 rows a step: 2.07x at 256 ranks, 3.1x at 512).
WINDOW_ROWS = 65536
# A pass of a small view lasts a few steps (the main job's 150 rows: 3), and each read is one Ray Data execution
# (~50 ms of the rank's CPU plus a round of Ray Data's own actors): one read spans consecutive passes up to this
# many of the rank's rows. A pass of at least this many rows is read alone, as before.
READ_ROWS = 4096


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
# The order of one pass, and which rows each rank reads of it.

# The golden ratio's fractional part: the multiples s * PHI mod 1 of any run of consecutive integers s spread
# evenly over [0, 1) (the three-distance theorem), and conversely every arc of [0, 1) holds an evenly spaced set of
# them. A window's pass order sorts its rows by u + s * PHI mod 1 (u random), so every run of consecutive pass
# positions, whatever its length, takes its rows evenly from the whole window.
PHI = (5 ** 0.5 - 1) / 2


@dataclass(frozen=True)
class Window:
    """Consecutive blocks of one pass, mixed together: pass positions [start, start + rows)."""
    number: int
    start: int
    blocks: tuple[int, ...]
    rows: int


def pass_windows(sizes: np.ndarray, seed: int, passes: int, window_rows: int = WINDOW_ROWS) -> list[Window]:
    """The windows of pass `passes`: blocks in a seeded random order, grouped until each holds >= window_rows."""
    order = np.random.default_rng([seed, passes]).permutation(len(sizes))
    ends = np.cumsum(np.asarray(sizes, np.int64)[order])
    windows, lo, start = [], 0, 0
    while lo < len(order):
        hi = min(int(np.searchsorted(ends, start + window_rows)) + 1, len(order))
        rows = int(ends[hi - 1]) - start
        windows.append(Window(len(windows), start, tuple(order[lo:hi].tolist()), rows))
        lo, start = hi, start + rows
    return windows


def window_storage(index: RowIndex, seed: int, passes: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(block, row of the index) at each *storage* position of the window: its blocks in pass order, each block's
    rows in a seeded random order (generated stores interleave classes row by row: a fixed stride through a block
    could land on one class)."""
    blocks = np.asarray(window.blocks, np.int64)
    counts = index.block_sizes(blocks)
    of_block = np.repeat(np.arange(len(blocks)), counts)
    natural = np.repeat(index.blocks["start"][blocks] - (np.cumsum(counts) - counts), counts) + np.arange(window.rows)
    mixed = np.lexsort((np.random.default_rng([seed, passes, window.number + 1]).random(window.rows), of_block))
    return blocks[of_block], natural[mixed]


def window_sequence(seed: int, passes: int, window: Window) -> np.ndarray:
    """Storage position at each pass position of the window (the Kronecker order of PHI above, offset seeded)."""
    u = np.random.default_rng([seed, passes, window.number + 1, 1]).random()
    return np.argsort((u + np.arange(window.rows) * PHI) % 1.0, kind="stable")


def rank_share(window: Window, sequence: np.ndarray, group: int, world: int, rank: int, first: int,
               end: int) -> np.ndarray:
    """The storage positions rank `rank` takes of the window, in the order it consumes them.

    Global batch b is pass positions [b*group, (b+1)*group) (group = world x rows per rank), the same rows for
    any world. Each global batch's part in this window is sorted by storage position, and the ranks take
    consecutive slices of it, in proportion: of the batch's first x positions, ranks < r take floor(r * x / world)
    (`_below`), so rank r takes its r-th world-quantile of every part, a batch split over two windows included, and
    exactly group / world rows of the whole batch. As each part is spread evenly over the window, rank r's slice is
    about the r-th world-quantile of the window's storage: its own blocks. (Splitting by t mod world instead gave the
    low ranks two rows of a small part and the high ranks one, so a rank's rows of the parts at a window's edges lay
    far from its own blocks: 2.3x reads at 64 ranks.) A part is a whole batch, starts or ends one, or is a whole
    window of >= world rows, so no rank's count is negative.
    """
    lo, hi = max(window.start, first), min(window.start + window.rows, end)
    if lo >= hi:
        return np.empty(0, np.int64)
    positions = np.arange(lo, hi)
    storage, batch = sequence[positions - window.start], positions // group
    order = np.lexsort((storage, batch))
    storage, batch = storage[order], batch[order]
    part_lo = np.maximum(lo, batch * group) - batch * group  # where this part starts within its global batch
    part_hi = np.minimum(hi, (batch + 1) * group) - batch * group
    k = np.arange(len(storage)) - (np.maximum(lo, batch * group) - lo)  # index within the part
    start = _below(part_hi, rank, world) - _below(part_lo, rank, world)
    stop = _below(part_hi, rank + 1, world) - _below(part_lo, rank + 1, world)
    return storage[(k >= start) & (k < stop)]


def _below(x: np.ndarray, r: int, world: int) -> np.ndarray:
    """How many of a batch's first x positions ranks < r take: their share of x, rounded down."""
    return (x * r) // world


@dataclass(frozen=True)
class PassPlan:
    """What one rank reads of one pass: pass positions [first, end) of `windows`, its share of each global batch
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

    def take(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(block, index row) of each row this rank takes of the window, in consumption order."""
        block, rows = window_storage(self.index, self.seed, self.passes, window)
        share = rank_share(window, window_sequence(self.seed, self.passes, window), self.batch * self.world,
                           self.world, self.rank, self.first, self.end)
        return block[share], rows[share]

    def reads(self, window: Window) -> tuple[int, int]:
        """(rows taken, rows read) of the window by this rank: it reads the whole row groups holding its rows."""
        block, _ = self.take(window)
        return len(block), int(self.index.blocks["stored"][np.unique(block)].sum())

    def for_window(self, window: Window) -> "PassPlan":
        """The plan of one window alone (what one read task carries): an index with a file behind it travels as
        its path; one without, as the window's blocks renumbered."""
        if self.index.path is not None:
            return replace(self, windows=(window,))
        local = replace(window, blocks=tuple(range(len(window.blocks))))
        return replace(self, index=self.index.subset(window.blocks), windows=(local,))


def read_window(plan: PassPlan, window: Window) -> pa.Table:
    """This rank's rows of one window (image, seed, label) in the order it consumes them: only the row groups
    holding them are read, each checked against its page checksums."""
    index = plan.index
    block, rows = plan.take(window)
    needed = np.unique(block)
    info = index.blocks[needed]
    columns = ["image", "seed"] + (["label"] if index.label is None else [])
    parts, at, offset = [], np.empty(len(needed), np.int64), 0  # at: where each needed block's rows begin
    for f in np.unique(info["file"]):
        mine = np.flatnonzero(info["file"] == f)
        parts.append(read_parquet(index.files[f], columns, row_groups=info["group"][mine].tolist()))
        at[mine] = offset + np.cumsum(info["stored"][mine]) - info["stored"][mine]
        offset += parts[-1].num_rows
    if not parts:
        return pa.table({"image": pa.array([], IMAGE_TYPE), "seed": pa.array([], pa.int64()),
                         "label": pa.array([], pa.int16())})
    where = np.searchsorted(needed, block)
    table = pa.concat_tables(parts).take(pa.array(at[where] + index.file_rows(rows, block) - info["first"][where]))
    if index.label is not None:
        table = table.append_column("label", pa.array(index.labels(rows), pa.int16()))
    return table.select(["image", "seed", "label"]).combine_chunks()


def read_pass_local(plan: PassPlan) -> Iterator[pa.Table]:
    """The pass in this process, window after window (tests, `raylab data mix-stats --local`)."""
    for window in plan.windows:
        one = plan.for_window(window)
        yield read_window(one, one.windows[0])


def read_passes_local(plans: Sequence[PassPlan]) -> Iterator[pa.Table]:
    """Consecutive passes in this process, one after another."""
    for plan in plans:
        yield from read_pass_local(plan)


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


PassReader = Callable[[Sequence[PassPlan]], Iterable[pa.Table]]  # consecutive passes' plans -> their tables


class GeneratedStream:
    """Fixed-size batches of generated rows for one rank, pass after pass, in the order described above."""

    def __init__(self, index: RowIndex, batch: int, *, seed: int, rank: int = 0, world: int = 1,
                 window_rows: int = WINDOW_ROWS, reader: PassReader = read_passes_local):
        if len(index) < batch * world:
            raise ValueError(f"the generated view has {len(index)} rows, fewer than one batch's {batch * world} "
                             f"({batch} per worker x {world})")
        if window_rows < world:  # a window split among more ranks than rows: a rank's count could go negative
            raise ValueError(f"window_rows={window_rows} must be at least the world size {world}")
        self.index, self.batch, self.seed, self.rank, self.world = index, batch, seed, rank, world
        self.window_rows, self.reader = window_rows, reader
        self.position = StreamPosition()
        self.last_seeds = np.empty(0, np.int64)  # the `seed` column of the last batch (traces, mix-stats)
        self._it: Iterator[pa.Table] | None = None
        self._until = 0  # the pass the current read ends before

    @property
    def batches_per_pass(self) -> int:
        return len(self.index) // (self.batch * self.world)

    @property
    def passes_per_read(self) -> int:
        """Passes one read spans: each pass gives this rank exactly batches_per_pass batches, so the passes' tables
        rebatch into whole batches that never straddle two passes."""
        return max(1, READ_ROWS // (self.batches_per_pass * self.batch))

    def pass_plan(self, passes: int | None = None) -> PassPlan:
        """What this rank reads of pass `passes` (default: the current pass from the current position on; a resume
        starts mid-pass), or of a later pass from its start."""
        current = passes is None or passes == self.position.passes
        passes = self.position.passes if passes is None else passes
        group = self.batch * self.world
        first, end = (self.position.offset if current else 0) * group, self.batches_per_pass * group
        windows = tuple(w for w in pass_windows(self.index.sizes, self.seed, passes, self.window_rows)
                        if w.start + w.rows > first and w.start < end)
        return PassPlan(self.index, windows, self.seed, passes, self.rank, self.world, self.batch, first, end)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position.offset >= self.batches_per_pass:
            self.position = StreamPosition(self.position.passes + 1, 0)
            if self.position.passes >= self._until:
                self._it = None
        if self._it is None:
            now = self.position.passes
            self._until = now + self.passes_per_read
            self._it = rebatch(self.reader([self.pass_plan(p) for p in range(now, self._until)]), self.batch)
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


def class_counts(index: RowIndex, chunk: int = 1 << 22) -> np.ndarray:
    """Rows per class of the index: its labels in chunks, or a whole store's `label` columns (read, not hashed)."""
    if index.label is not None:
        parts: Iterable = (index.label[a:a + chunk] for a in range(0, len(index), chunk))
    else:
        parts = (read_parquet(f, ["label"]).column("label").to_numpy() for f in index.files)
    total = np.zeros(0, np.int64)
    for part in parts:
        counts = np.bincount(np.asarray(part, np.int64))
        total = np.pad(total, (0, max(0, len(counts) - len(total))))
        total[:len(counts)] += counts
    return total


def mix_stats(label_batches: Sequence[np.ndarray], index: RowIndex) -> MixStats:
    counts_all = class_counts(index)
    classes = len(counts_all)
    expected = counts_all / counts_all.sum()
    counts = np.stack([np.bincount(b, minlength=classes) for b in label_batches])
    return MixStats(counts, expected, uniform_max_share(expected, int(counts[0].sum())))
