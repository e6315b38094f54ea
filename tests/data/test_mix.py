"""The generated stream's pass order (pure: the same window code the Ray Data ingest runs, read in-process)."""
import numpy as np
import pytest

from raylab.data.mix import (READ_ROWS, GeneratedStream, Window, pass_windows, rank_share, read_passes_local, rebatch,
                             window_sequence)
from raylab.data.row_index import RowIndex
from raylab.data.shards import ShardStore

N, SHARD = 1200, 100


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A class-sorted store (as a class-major plan wrote them): 12 shards, each one class of 10."""
    root = tmp_path_factory.mktemp("mix") / "store"
    store = ShardStore(root).create_or_open({"test": "mix"})
    labels = np.repeat(np.arange(10), N // 10).astype(np.int16)
    images = np.zeros((N, 32, 32, 3), np.uint8)
    for a in range(0, N, SHARD):
        rows = slice(a, a + SHARD)
        store.write_shard(a, a + SHARD - 1, {"image": images[rows], "label": labels[rows],
                                             "seed": np.arange(a, a + SHARD), "class_cond": labels[rows]})
    files = [str(p) for p in store.shard_paths()]
    shard = np.arange(N) // SHARD
    return RowIndex.from_positions(files, shard, np.arange(N) % SHARD, labels)


def global_batches(index, world, per_rank, count, **kw):
    """The union over ranks of each step's rows (seeds), as the ranks of one DDP run read them."""
    ranks = [GeneratedStream(index, per_rank, seed=7, rank=r, world=world, window_rows=250, **kw) for r in range(world)]
    out = []
    for _ in range(count):
        parts = []
        for stream in ranks:
            stream.next_batch()
            parts.append(stream.last_seeds.copy())
        out.append(parts)
    return out, ranks


def test_a_pass_is_the_same_for_any_number_of_workers(index):
    one, _ = global_batches(index, 1, 60, 40)
    two, _ = global_batches(index, 2, 30, 40)
    four, _ = global_batches(index, 4, 15, 40)
    as_sets = lambda batches: [sorted(np.concatenate(b).tolist()) for b in batches]  # noqa: E731
    assert as_sets(one) == as_sets(two) == as_sets(four)


def test_ranks_are_disjoint_and_a_pass_reads_every_row_once(index):
    batches, ranks = global_batches(index, 3, 20, 20)  # 20 global batches of 60 = one pass of 1200
    assert ranks[0].batches_per_pass == 20
    for r in range(3):
        mine = np.concatenate([b[r] for b in batches])
        others = np.concatenate([b[o] for b in batches for o in range(3) if o != r])
        assert len(np.intersect1d(mine, others)) == 0 and len(np.unique(mine)) == len(mine)
    assert sorted(np.concatenate([np.concatenate(b) for b in batches]).tolist()) == list(range(N))


def test_every_pass_has_its_own_order(index):
    batches, ranks = global_batches(index, 1, 60, 40)
    first, second = [b[0].tolist() for b in batches[:20]], [b[0].tolist() for b in batches[20:]]
    assert ranks[0].position.passes == 2 or ranks[0].position.offset == 20
    assert sorted(sum(first, [])) == sorted(sum(second, [])) and first != second
    assert [w.blocks for w in pass_windows(index.sizes, 7, 0, 250)] != [w.blocks for w in
                                                                          pass_windows(index.sizes, 7, 1, 250)]


def test_a_resumed_stream_continues_exactly(index):
    straight = GeneratedStream(index, 50, seed=3, window_rows=250)
    seen = [straight.next_batch() and straight.last_seeds.copy() for _ in range(30)]
    cut = GeneratedStream(index, 50, seed=3, window_rows=250)
    for _ in range(17):
        cut.next_batch()
    resumed = GeneratedStream(index, 50, seed=3, window_rows=250)
    resumed.load_state_dict(cut.state_dict())  # mid-pass (24 batches a pass), then across a pass boundary
    for expected in seen[17:]:
        images, labels = resumed.next_batch()
        assert resumed.last_seeds.tolist() == expected.tolist() and len(labels) == 50


def test_windows_are_bounded_and_cover_the_pass(index):
    windows = pass_windows(index.sizes, 1, 0, 250)
    assert all(250 <= w.rows < 250 + SHARD for w in windows[:-1])
    assert sum(w.rows for w in windows) == N and windows[0].start == 0
    assert all(a.start + a.rows == b.start for a, b in zip(windows, windows[1:]))
    assert sorted(b for w in windows for b in w.blocks) == list(range(N // SHARD))


def test_rebatch_cuts_exact_sizes():
    import pyarrow as pa

    tables = [pa.table({"x": np.arange(a, b)}) for a, b in ((0, 3), (3, 10), (10, 11), (11, 25))]
    out = [t.column("x").to_pylist() for t in rebatch(tables, 4)]
    assert out == [list(range(i, i + 4)) for i in range(0, 24, 4)]  # the tail of 1 is dropped


def test_too_small_a_view_is_one_line(index):
    with pytest.raises(ValueError, match="fewer than one batch"):
        GeneratedStream(index, 700, seed=0, world=2)


def test_a_batch_split_over_two_windows_is_shared_by_storage_quantile():
    """64 ranks of 10 rows; window 1 holds the last 280 rows of batch 1, batch 2 and the first 80 rows of batch 3.
    Every rank takes its own world-quantile of the window's storage from each part (so it reads its own row groups),
    and the ranks together take the window once. Split by position mod 64, the first 16 ranks took 2 rows of the
    80-row part and the others 1: rank r's rows of it lay near 2r/80 of the window, not r/64 (2.3x reads at 64)."""
    world, per_rank, rows = 64, 10, 1000
    window = Window(1, rows, (1,), rows)
    sequence = window_sequence(3, 0, window)
    gap = rows / 80  # the spacing of the smallest part's rows in storage
    taken = []
    for rank in range(world):
        mine = rank_share(window, sequence, world * per_rank, world, rank, 0, 4 * world * per_rank)
        lo, hi = rank * rows / world, (rank + 1) * rows / world
        assert mine.min() >= lo - 2 * gap and mine.max() < hi + 2 * gap, (rank, mine.min(), mine.max())
        taken.append(mine)
    assert sorted(np.concatenate(taken).tolist()) == list(range(rows))


def test_a_window_smaller_than_the_world_is_one_line(index):
    with pytest.raises(ValueError, match="window_rows=50 must be at least the world size 60"):
        GeneratedStream(index, 10, seed=0, world=60, window_rows=50)


def counting_reader(calls):
    def read(plans):
        calls.append([p.passes for p in plans])
        return read_passes_local(plans)
    return read


def test_a_small_view_is_read_many_passes_at_a_time_in_the_same_order(index, monkeypatch):
    """A pass of the main job's view lasts 3 steps; each read is a Ray Data execution, so one read spans passes up
    to READ_ROWS of the rank's rows, and the batches are those of pass-by-pass reads."""
    calls = []
    many = GeneratedStream(index, 50, seed=3, window_rows=250, reader=counting_reader(calls))
    assert many.passes_per_read == READ_ROWS // 1200  # 24 batches of 50 a pass
    got = [many.next_batch() and many.last_seeds.copy() for _ in range(24 * 5)]
    assert calls == [[0, 1, 2], [3, 4, 5]]
    monkeypatch.setattr("raylab.data.mix.READ_ROWS", 1)
    calls.clear()
    one = GeneratedStream(index, 50, seed=3, window_rows=250, reader=counting_reader(calls))
    assert [one.next_batch() and one.last_seeds.tolist() for _ in range(24 * 5)] == [g.tolist() for g in got]
    assert calls == [[p] for p in range(5)]


def test_a_stream_resumed_inside_a_many_pass_read_continues_exactly(index):
    straight = GeneratedStream(index, 50, seed=3, window_rows=250)
    seen = [straight.next_batch() and straight.last_seeds.copy() for _ in range(100)]
    cut = GeneratedStream(index, 50, seed=3, window_rows=250)
    for _ in range(37):  # pass 1, offset 13: inside the first read of passes 0-2
        cut.next_batch()
    resumed = GeneratedStream(index, 50, seed=3, window_rows=250)
    resumed.load_state_dict(cut.state_dict())
    assert [resumed.next_batch() and resumed.last_seeds.tolist() for _ in range(63)] == [s.tolist() for s in seen[37:]]
