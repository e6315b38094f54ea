"""Shard store: exact round trips, manifest, crash safety, concurrent writers, verification, selection."""
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylab.data import shard_format, shard_layout, shards
from raylab.data.shard_format import ShardError
from raylab.data.shards import ShardStore, read_numpy, read_table
from raylab.data.shard_verify import verify_store
from raylab.io import sha256_file

IDENTITY = {"generator": "edm-test", "steps": 18, "seeds": [0, 99]}


def make_columns(first, n, scored=False, seed=0):
    """n rows with seeds first..first+n-1; image 0 all zeros, image 1 ends in zero bytes (the S3072 trap)."""
    rng = np.random.default_rng(seed + first)
    images = rng.integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    if n > 1:
        images[1, -1, -1] = 0  # last pixel black: the last 3 bytes are NUL
    cols = {"image": images, "label": rng.integers(0, 10, n), "seed": np.arange(first, first + n),
            "class_cond": np.full(n, -1)}
    if scored:
        cols |= {"score": rng.random(n), "pred": rng.integers(0, 10, n), "confidence": rng.random(n)}
    return cols


@pytest.fixture()
def store(tmp_path):
    return ShardStore(tmp_path / "store").create_or_open(IDENTITY)


def write_two(store, scored=False):
    a, b = make_columns(0, 7, scored), make_columns(10, 5, scored)
    store.write_shard(0, 9, a)
    store.write_shard(10, 19, b)
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def test_numpy_round_trip_is_byte_exact(store):
    want = write_two(store, scored=True)
    got = read_numpy(store.root)
    assert list(got) == ["image", "label", "seed", "class_cond", "score", "pred", "confidence"]
    assert got["image"].dtype == np.uint8 and got["image"].shape == (12, 32, 32, 3)
    assert not got["image"][0].any() and not got["image"][1, -1, -1].any() and got["image"][1].any()
    np.testing.assert_array_equal(got["image"], want["image"])
    for name, dtype in [("label", np.int16), ("seed", np.int64), ("class_cond", np.int16), ("pred", np.int16),
                        ("score", np.float32), ("confidence", np.float32)]:
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name], want[name].astype(dtype))


def test_table_input_and_column_subset(store):
    cols = make_columns(0, 4)
    table = pa.table({"seed": cols["seed"], "image": shard_format.encode_images(cols["image"], pa.binary(3072)),
                      "label": cols["label"], "class_cond": cols["class_cond"]})
    store.write_shard(0, 3, table)
    got = read_numpy(store.root, columns=["seed", "image"])
    assert list(got) == ["seed", "image"]
    np.testing.assert_array_equal(got["image"], cols["image"])
    with pytest.raises(ShardError, match="not in the store"):
        read_table(store.root, columns=["score"])


@pytest.mark.ray
def test_ray_dataset_round_trip(store, ray_session):
    want = write_two(store)
    ds = shards.read_dataset(store.root)
    batches = list(ds.iter_batches(batch_size=4, batch_format="pyarrow"))
    images = np.concatenate([shard_format.decode_images(b.column("image")) for b in batches])
    seeds = np.concatenate([b.column("seed").to_numpy() for b in batches])
    order = np.argsort(seeds)
    np.testing.assert_array_equal(seeds[order], want["seed"])
    np.testing.assert_array_equal(images[order], want["image"])


def test_manifest_records_each_shard(store):
    write_two(store)
    m = json.loads((store.root / "manifest.json").read_text())
    assert m["format"] == 1 and m["identity"] == IDENTITY and m["identity_hash"] == shard_layout.identity_hash(IDENTITY)
    assert sorted(m["shards"]) == ["gen-0000000000-0000000009.parquet", "gen-0000000010-0000000019.parquet"]
    for name, rows in [("gen-0000000000-0000000009.parquet", 7), ("gen-0000000010-0000000019.parquet", 5)]:
        entry, path = m["shards"][name], store.root / name
        assert entry["rows"] == rows == pq.read_metadata(path).num_rows
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        meta = pq.read_schema(path).metadata
        assert json.loads(meta[b"raylab.identity"]) == IDENTITY
    assert store.shard_paths() == [store.root / "gen-0000000000-0000000009.parquet",
                                   store.root / "gen-0000000010-0000000019.parquet"]
    assert verify_store(store.root) == []


def test_identity_mismatch_names_both_hashes(store):
    other = {**IDENTITY, "steps": 20}
    with pytest.raises(ShardError) as err:
        ShardStore(store.root).create_or_open(other)
    msg = str(err.value)
    assert shard_layout.identity_hash(IDENTITY) in msg and shard_layout.identity_hash(other) in msg and "\n" not in msg
    assert ShardStore(store.root).create_or_open(json.loads(json.dumps(IDENTITY))).identity_hash == \
        shard_layout.identity_hash(IDENTITY)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(label=c["label"].astype(np.float64)), "'label': dtype float64"),
    (lambda c: c.update(label=c["label"] + 40000), "'label': values must lie"),
    (lambda c: c.update(seed=c["seed"] + 5), "outside the shard's range"),
    (lambda c: c.update(seed=np.zeros(7, np.int64)), "unique"),
    (lambda c: c.update(class_cond=c["class_cond"][:3]), "different lengths"),
    (lambda c: c.pop("class_cond"), "missing \\['class_cond'\\]"),
    (lambda c: c.update(extra=c["label"]), "unknown \\['extra'\\]"),
    (lambda c: c.update(image=c["image"][:, :16]), "shape"),
    (lambda c: c.update(image=c["image"].astype(np.int16)), "uint8"),
])
def test_bad_columns_are_refused_before_writing(store, change, match):
    cols = make_columns(0, 7)
    change(cols)
    with pytest.raises(ShardError, match=match):
        store.write_shard(0, 9, cols)
    assert store.manifest["shards"] == {} and list(store.root.glob("*.parquet")) == []


def test_overlap_and_column_set_are_refused(store):
    store.write_shard(0, 9, make_columns(0, 7))
    with pytest.raises(ShardError, match="overlaps gen-0000000000-0000000009"):
        store.write_shard(5, 14, make_columns(10, 3))
    with pytest.raises(ShardError, match="columns"):
        store.write_shard(10, 19, make_columns(10, 3, scored=True))
    with pytest.raises(ShardError, match="seed range"):
        store.write_shard(9, 3, make_columns(3, 3))


def test_write_before_create_is_refused(tmp_path):
    with pytest.raises(ShardError, match="manifest missing"):
        ShardStore(tmp_path).write_shard(0, 9, make_columns(0, 3))


def test_failed_write_leaves_no_shard_and_no_entry(store, monkeypatch):
    def half_then_fail(table, path):
        Path(path).write_bytes(b"PAR1" + b"\0" * 1000)  # a partial file, then the writer dies
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards, "write_shard_file", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        store.write_shard(0, 9, make_columns(0, 7))
    assert sorted(p.name for p in store.root.iterdir()) == [".manifest.lock", "manifest.json"]
    assert store.manifest["shards"] == {} and not store.has_shard(0, 9)
    assert verify_store(store.root) == []


def test_killed_writer_leaves_only_a_temp_file(store):
    # A hard crash (os._exit mid-write) cannot clean up: the temp file stays, hidden and never in the manifest.
    code = textwrap.dedent(f"""
        import os, numpy as np
        from raylab.data import shards
        def die(table, path):
            open(path, "wb").write(b"PAR1partial")
            os._exit(3)
        shards.write_shard_file = die
        cols = {{"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.zeros(2), "seed": np.arange(2),
                 "class_cond": np.zeros(2)}}
        cols["label"] = cols["label"].astype(int); cols["class_cond"] = cols["class_cond"].astype(int)
        shards.ShardStore({str(store.root)!r}).write_shard(0, 9, cols)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    assert store.manifest["shards"] == {} and list(store.root.glob("gen-*")) == []
    assert store.missing([(0, 9)]) == [(0, 9)]
    problems = verify_store(store.root)
    assert len(problems) == 1 and "leftover temp file" in problems[0] and ".gen-0000000000-0000000009" in problems[0]
    assert len(shard_layout.remove_temp_files(store.root)) == 1 and verify_store(store.root) == []


def test_concurrent_thread_writers_are_all_recorded(store):
    ranges = [(10 * i, 10 * i + 9) for i in range(8)]
    errors = []

    def write(a, b):
        try:
            store.write_shard(a, b, make_columns(a, 6))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=write, args=r) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.manifest["shards"]) == 8 and store.missing(ranges) == []
    assert verify_store(store.root) == []


def test_concurrent_process_writers_are_all_recorded(store):
    code = textwrap.dedent("""
        import sys, numpy as np
        from raylab.data.shards import ShardStore
        root, first = sys.argv[1], int(sys.argv[2])
        for k in range(3):  # several shards each, so manifest updates really interleave
            a = first + 10 * k
            n = 5
            ShardStore(root).write_shard(a, a + 9, {"image": np.full((n, 32, 32, 3), k, np.uint8),
                "label": np.arange(n), "seed": np.arange(a, a + n), "class_cond": np.full(n, -1)})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store.root), str(100 * p)]) for p in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    ranges = [(100 * p + 10 * k, 100 * p + 10 * k + 9) for p in range(4) for k in range(3)]
    assert len(store.manifest["shards"]) == 12 and store.missing(ranges) == []
    assert verify_store(store.root) == []
    assert len(read_numpy(store.root)["seed"]) == 60


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (_truncate, ["size", "unreadable or truncated Parquet"]),
    (_flip_byte, ["sha256"]),
    (lambda p: p.unlink(), ["missing"]),
])
def test_verify_store_finds_damaged_shards(store, damage, expected):
    write_two(store)
    victim = store.root / "gen-0000000010-0000000019.parquet"
    damage(victim)
    problems = verify_store(store.root)
    assert all(victim.name in p for p in problems)
    assert all(any(word in p for p in problems) for word in expected) and len(problems) >= 1
    assert not store.has_shard(10, 19) or damage is _flip_byte
    with pytest.raises(ShardError, match=victim.name):
        read_numpy(store.root)
    assert len(read_numpy(store.root, verify=False, rows={"gen-0000000000-0000000009.parquet": [0]})["seed"]) == 1


@pytest.mark.ray
@pytest.mark.parametrize("damage, match", [
    (_flip_byte, r"gen-0000000010-0000000019\.parquet: sha256 \S+ != manifest \S+ \(corrupted\); run `raylab data "
                 r"verify "),
    (lambda p: p.unlink(), r"gen-0000000010-0000000019\.parquet: shard listed in the manifest is missing$"),
])
def test_ray_dataset_refuses_a_damaged_store_naming_the_file(store, ray_session, damage, match):
    """Checked in the driver before Ray plans a read: no Ray task error, no silently shorter dataset."""
    write_two(store)
    victim = store.root / "gen-0000000010-0000000019.parquet"
    damage(victim)
    with pytest.raises(ShardError, match=match) as err:
        shards.read_dataset(store.root, columns=["seed"])  # a column subset is verified as a whole store too
    assert str(err.value).startswith(str(victim)) and "\n" not in str(err.value)


def test_verify_store_finds_orphans_and_bad_manifests(store, tmp_path):
    write_two(store)
    orphan = store.root / "gen-0000000100-0000000199.parquet"
    orphan.write_bytes((store.root / "gen-0000000000-0000000009.parquet").read_bytes())
    assert verify_store(store.root) == [f"{orphan}: shard file not in the manifest (orphan)"]
    orphan.unlink()
    other = ShardStore(tmp_path / "other").create_or_open({"x": 1})
    other.write_shard(0, 9, make_columns(0, 3))
    foreign = store.root / "gen-0000000000-0000000009.parquet"  # a shard of another store, manifest edited to fit
    foreign.write_bytes((other.root / foreign.name).read_bytes())
    m = store.manifest
    m["shards"][foreign.name] |= {"sha256": sha256_file(foreign), "bytes": foreign.stat().st_size}
    (store.root / "manifest.json").write_text(json.dumps(m))
    problems = verify_store(store.root)
    assert any("rows" in p for p in problems) and any("identity" in p for p in problems)
    (store.root / "manifest.json").write_text("{not json")
    assert len(verify_store(store.root)) == 1 and "not valid JSON" in verify_store(store.root)[0]
    assert "manifest missing" in verify_store(tmp_path / "nothing")[0]


def test_row_selection(store):
    want = write_two(store, scored=True)
    a, b = "gen-0000000000-0000000009.parquet", "gen-0000000010-0000000019.parquet"
    got = read_numpy(store.root, rows={b: np.array([4, 0]), a: np.array([6, 2, 2])})
    idx = [6, 2, 2, 7 + 4, 7 + 0]  # shards in seed order, rows in the order given
    for k in want:
        np.testing.assert_array_equal(got[k], want[k][idx].astype(got[k].dtype))
    assert len(read_numpy(store.root, rows={a: np.array([], np.int64)})["image"]) == 0
    with pytest.raises(ShardError, match=f"row selection for {b}"):
        read_numpy(store.root, rows={b: np.array([5])})
    with pytest.raises(ShardError, match="not in the store"):
        read_numpy(store.root, rows={"gen-0000000099-0000000099.parquet": np.array([0])})


def test_missing_and_has_shard(store):
    store.write_shard(np.int64(0), np.int32(9), make_columns(0, 3))  # numpy ints are fine, stored as ints
    store.write_shard(20, 29, make_columns(20, 3))
    assert store.manifest["shards"][shard_layout.shard_name(0, 9)]["last_seed"] == 9
    plan = [(0, 9), (10, 19), (20, 29), (30, 39)]
    assert store.missing(plan) == [(10, 19), (30, 39)]
    (store.root / "gen-0000000020-0000000029.parquet").unlink()
    assert not store.has_shard(20, 29) and store.missing(plan) == [(10, 19), (20, 29), (30, 39)]
    store.write_shard(20, 29, make_columns(20, 3))  # resume rewrites it
    assert store.has_shard(20, 29)


def test_decode_images_across_arrow_types():
    images = make_columns(0, 6)["image"]
    for image_type in (pa.binary(), pa.large_binary(), pa.binary(3072)):
        arr = shard_format.encode_images(images, image_type)
        np.testing.assert_array_equal(shard_format.decode_images(arr.slice(2, 3)), images[2:5])
        np.testing.assert_array_equal(shard_format.decode_images(pa.chunked_array([arr.slice(4), arr.slice(0, 2)])),
                                      images[[4, 5, 0, 1]])
    with pytest.raises(ShardError, match="3072 bytes"):
        shard_format.decode_images(pa.array([b"\0" * 3072, b"\0" * 3071]))
    with pytest.raises(ShardError, match="not binary"):
        shard_format.decode_images(pa.array([1, 2]))


def test_empty_store_reads_empty(store):
    assert read_table(store.root).num_rows == 0
    assert read_numpy(store.root)["image"].shape == (0, 32, 32, 3)
