"""The row index stored beside its view, shards verified once per file version, damage caught at read time, and
ranks reading only the row groups holding their rows."""
import os
import pickle

import numpy as np
import pytest

from raylab.config import SelectConfig
from raylab.data import mix, shard_verify
from raylab.data.mix import GeneratedStream, read_pass_local
from raylab.data.shard_format import ShardError
from raylab.data.shards import ShardStore, read_parquet
from raylab.pipeline.generated_input import open_generated
from raylab.pipeline.select import SelectError, build_view

N, SHARD, CLASSES = 3000, 1000, 10


@pytest.fixture()
def store(tmp_path):
    """N random images with seed = row, label = seed mod CLASSES, in shards of SHARD rows (row groups of 128)."""
    store = ShardStore(tmp_path / "store").create_or_open({"test": "row-index"})
    rng = np.random.default_rng(0)
    for a in range(0, N, SHARD):
        seed = np.arange(a, a + SHARD)
        store.write_shard(a, a + SHARD - 1, {"image": rng.integers(0, 256, (SHARD, 32, 32, 3), dtype=np.uint8),
                                             "label": seed % CLASSES, "seed": seed, "class_cond": seed % CLASSES})
    return store


def test_a_view_index_is_built_once_beside_the_view_and_names_its_rows(store, tmp_path):
    """A view keeping most of its store's rows (2/3) is indexed in place; a sparse one is read from a compact copy
    (tests/pipeline/test_compact.py)."""
    view = build_view(store.root, SelectConfig(policy="none", amount=2000), tmp_path / "view")
    index = open_generated(tmp_path / "view")
    assert (tmp_path / "view" / "index" / "index.json").is_file() and isinstance(index.row, np.memmap)
    assert len(index) == 2000 and len(pickle.dumps(index)) < 500  # travels as its path
    built = os.stat(tmp_path / "view" / "index" / "index.json").st_mtime_ns
    again = open_generated(tmp_path / "view")
    assert os.stat(tmp_path / "view" / "index" / "index.json").st_mtime_ns == built and len(again) == 2000
    stream = GeneratedStream(index, 2000, seed=1, window_rows=256)  # one batch = the whole view, read from shards
    images, labels = stream.next_batch()
    order = np.argsort(stream.last_seeds)
    assert stream.last_seeds[order].tolist() == view.seed.tolist() and labels[order].tolist() == view.label.tolist()


def test_a_torn_rows_file_is_refused_and_a_rewritten_view_reindexed(store, tmp_path):
    build_view(store.root, SelectConfig(policy="none", amount=600), tmp_path / "view")
    rows = tmp_path / "view" / "rows.npz"
    rows.write_bytes(rows.read_bytes()[:-10])
    with pytest.raises(SelectError, match="torn write"):
        open_generated(tmp_path / "view")
    build_view(store.root, SelectConfig(policy="none", amount=300), tmp_path / "view")
    assert len(open_generated(tmp_path / "view")) == 300  # not the 600 of the index built before


def test_shards_are_hashed_once_per_file_version(store, monkeypatch):
    """A start stats the shards; it hashes only a file whose size or mtime changed since it was last verified
    (the writer records its own hash as verified). Before, every start hashed every shard (154 GB at 50M)."""
    hashed = []
    real = shard_verify.sha256_file
    monkeypatch.setattr(shard_verify, "sha256_file", lambda p: hashed.append(p) or real(p))
    open_generated(store.root)
    open_generated(store.root)
    assert hashed == []
    victim = store.shard_paths()[1]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # touched: check again
    open_generated(store.root)
    open_generated(store.root)
    assert hashed == [victim]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SelectError, match=rf"{victim.name}: sha256 .* \(corrupted\); run `raylab data verify"):
        open_generated(store.root)


def _damage_in_place(path):
    """Flip one image byte of the first row group, keeping the file's size and mtime (what a start cannot see)."""
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[200_000] ^= 0xFF  # inside the first row group's image page (128 x 3072 bytes from ~offset 4)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damage_the_start_cannot_see_is_caught_when_the_page_is_read(store, monkeypatch):
    index = open_generated(store.root)
    _damage_in_place(store.shard_paths()[0])
    open_generated(store.root)  # same size and mtime: passes on a stat
    with pytest.raises(ShardError, match=r"gen-0000000000-0000000999\.parquet: unreadable or damaged Parquet"):
        list(read_pass_local(GeneratedStream(index, 100, seed=0, window_rows=N).pass_plan()))
    # The negative control: without the page checksums the same read returns the damaged pixels silently.
    monkeypatch.setattr(mix, "read_parquet", lambda path, columns, row_groups=None: __import__(
        "pyarrow.parquet").parquet.ParquetFile(path).read_row_groups(row_groups, columns=columns))
    assert sum(t.num_rows for t in read_pass_local(GeneratedStream(index, 100, seed=0, window_rows=N).pass_plan()))


def test_a_rank_reads_exactly_the_row_groups_its_plan_counts(store, monkeypatch):
    index = open_generated(store.root)
    read_rows = []

    def counting(path, columns=None, row_groups=None):
        table = read_parquet(path, columns, row_groups)
        read_rows.append(table.num_rows)
        return table
    monkeypatch.setattr(mix, "read_parquet", counting)
    for rank in range(4):
        stream = GeneratedStream(index, 40, seed=2, rank=rank, world=4, window_rows=2048)
        plan = stream.pass_plan()
        read_rows.clear()
        got = sum(t.num_rows for t in read_pass_local(plan))
        taken, read = np.sum([plan.reads(w) for w in plan.windows], axis=0)
        assert got == taken == stream.batches_per_pass * 40 and sum(read_rows) == read
        assert read < 2 * taken  # its quarter of each window (4 row groups) and the edges, not all 16
