"""A sparse view (the paper's top 20% per class) read from a compact copy of its rows: the same rows, labels and
images as the view names, the view's identity unchanged, written atomically and resumed after an interruption,
and reads per rank within 2x the rows consumed (they were ~1/f of them, f the kept fraction)."""
import json

import numpy as np
import pytest

from raylab.config import SelectConfig
from raylab.data.mix import GeneratedStream, read_pass_local
from raylab.data.shard_format import decode_images
from raylab.data.shards import ShardStore, read_numpy
from raylab.pipeline import compact
from raylab.pipeline.generated_input import generated_input, open_generated
from raylab.pipeline.select import build_view, load_view

N, SHARD, CLASSES = 6000, 1000, 10


@pytest.fixture()
def store(tmp_path):
    """N random images in shards of SHARD rows (row groups of 128), labels dealt at random, random scores."""
    rng = np.random.default_rng(0)
    store = ShardStore(tmp_path / "store").create_or_open({"test": "compact"})
    for a in range(0, N, SHARD):
        label = rng.integers(0, CLASSES, SHARD)
        store.write_shard(a, a + SHARD - 1, {
            "image": rng.integers(0, 256, (SHARD, 32, 32, 3), dtype=np.uint8), "label": label,
            "seed": np.arange(a, a + SHARD), "class_cond": label, "score": rng.random(SHARD).astype(np.float32)})
    return store


def top20(store, out):
    return build_view(store.root, SelectConfig(policy="topk", top_fraction=0.2), out)


def whole_pass(index, world=1, rank=0, batch=100):
    stream = GeneratedStream(index, batch, seed=3, rank=rank, world=world, window_rows=2048)
    plan = stream.pass_plan()
    return stream, plan, list(read_pass_local(plan))


def test_a_top20_view_streams_its_own_rows_from_a_compact_copy(store, tmp_path):
    view = top20(store, tmp_path / "view")
    identity = generated_input(tmp_path / "view").lineage["manifest_hash"]
    index = open_generated(tmp_path / "view")
    assert len(index) == len(view) and 1200 <= len(view) < 1210  # ceil(0.2 n_c) per class
    assert {f.rsplit("/", 2)[1] for f in index.files} == {"compact"}
    record = json.loads((tmp_path / "view" / "view.json").read_text())["compact"]
    assert record["rows"] == len(view)
    assert record["shards_sha256"] == compact.shards_digest(tmp_path / "view" / "compact")
    assert generated_input(tmp_path / "view").lineage["manifest_hash"] == identity  # derived data: same identity
    _, _, tables = whole_pass(index, batch=len(view))
    seeds = np.concatenate([t.column("seed").to_numpy() for t in tables])
    order = np.argsort(seeds)
    assert seeds[order].tolist() == view.seed.tolist()  # every kept row once, no other
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])[order]
    images = np.concatenate([decode_images(t.column("image")) for t in tables])[order]
    source = read_numpy(store.root, ["image", "seed"])
    assert labels.tolist() == view.label.tolist() and np.array_equal(images, source["image"][view.seed])


def test_a_dense_view_is_not_copied(store, tmp_path):
    build_view(store.root, SelectConfig(policy="none"), tmp_path / "view")
    index = open_generated(tmp_path / "view")
    assert not (tmp_path / "view" / "compact").exists() and index.path == str(tmp_path / "view" / "index")


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_of_a_top20_view_reads_at_most_twice_what_it_consumes(store, tmp_path, world):
    """Counted on real reads. Without the copy each row group read held ~1/5 rows of the view: ~5x. (A 1,200-row
    view is 10 row groups; more ranks, and the rest of the worlds, at 2M rows in tests/data/test_at_scale.py.)"""
    top20(store, tmp_path / "view")
    index = open_generated(tmp_path / "view")
    for rank in range(world):
        stream, plan, tables = whole_pass(index, world, rank, batch=200 // world)
        taken, read = np.sum([plan.reads(w) for w in plan.windows], axis=0)
        assert sum(t.num_rows for t in tables) == taken == stream.batches_per_pass * (200 // world)
        assert read <= 2 * taken, (rank, taken, read)


def test_an_interrupted_copy_is_never_seen_whole_and_resumes(store, tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "COMPACT_SHARD_ROWS", 200)  # 7 shards of ~1,205 rows
    monkeypatch.setattr(compact, "RECORD_EVERY", 1)
    view = top20(store, tmp_path / "view")
    real, made = compact._compact_table, []

    def dies_at_the_fourth(sources, cols, a, b):
        if len(made) == 3:
            raise KeyboardInterrupt  # killed mid-copy
        made.append(a)
        return real(sources, cols, a, b)
    monkeypatch.setattr(compact, "_compact_table", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        open_generated(tmp_path / "view")
    assert not (tmp_path / "view" / "compact").exists()
    assert "compact" not in json.loads((tmp_path / "view" / "view.json").read_text())
    kept = len(ShardStore(tmp_path / "view" / ".compact.tmp").manifest["shards"])
    assert 1 <= kept <= 3  # each shard whole (renamed into place, then recorded)
    made.clear()
    monkeypatch.setattr(compact, "_compact_table", lambda *a: made.append(a[2]) or real(*a))
    index = open_generated(tmp_path / "view")
    assert len(made) == 7 - kept and len(index) == len(view)  # only the missing shards written again
    assert not (tmp_path / "view" / ".compact.tmp").exists()


def test_a_view_selected_again_gets_a_new_copy(store, tmp_path):
    top20(store, tmp_path / "view")
    first = open_generated(tmp_path / "view")
    build_view(store.root, SelectConfig(policy="topk", top_fraction=0.1), tmp_path / "view")
    again = open_generated(tmp_path / "view")
    assert len(first) >= 1200 and len(again) == len(load_view(tmp_path / "view")) < 610


def test_a_copy_renamed_but_not_recorded_is_recorded_without_writing_it_again(store, tmp_path, monkeypatch):
    top20(store, tmp_path / "view")
    open_generated(tmp_path / "view")
    meta = json.loads((tmp_path / "view" / "view.json").read_text())
    del meta["compact"]  # killed between the rename and the record
    (tmp_path / "view" / "view.json").write_text(json.dumps(meta))
    made = []
    real = compact._compact_table
    monkeypatch.setattr(compact, "_compact_table", lambda *a: made.append(a[2]) or real(*a))
    assert len(open_generated(tmp_path / "view")) == meta["rows"] and made == []
    assert "compact" in json.loads((tmp_path / "view" / "view.json").read_text())
