"""Importing np.savez generated data: exact round trip, bounded memory, resume, refusals."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from raylab.data import npz_import, shard_layout, shards

from raylab.data.npz_import import Layout, import_npz, open_npz_arrays, store_sources
from raylab.data.shard_format import ShardError
from raylab.data.shards import read_numpy
from raylab.data.shard_verify import verify_store


def make_npz(path, n, seed=0, compressed=False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0] = 0  # all-zero image and one ending in zero bytes must survive byte-exactly
    images[-1, -1, -1] = 0
    labels = rng.integers(0, 10, n).astype(np.int64)
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    return images, labels


def test_round_trip_is_byte_exact(tmp_path):
    images, labels = make_npz(tmp_path / "gen.npz", 2500)
    store = import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=1000, identity_extra={"note": "t"},
                       num_classes=10)
    got = read_numpy(store.root)
    order = store_sources([2500], 1000)  # store row k is file row order[k]: shards in random class order
    assert sorted(order.tolist()) == list(range(2500)) and not np.array_equal(order, np.arange(2500))
    np.testing.assert_array_equal(got["image"], images[order])
    np.testing.assert_array_equal(got["label"], labels[order])
    np.testing.assert_array_equal(got["class_cond"], labels[order])
    np.testing.assert_array_equal(got["seed"], np.arange(2500))
    m = store.manifest
    spans = sorted((e["first_seed"], e["last_seed"], e["rows"]) for e in m["shards"].values())
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == 2499  # 2500 rows over ceil(2500/1000) shards
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:])) and all(800 <= n <= 1000 for *_, n in spans)
    ident = m["identity"]
    assert ident["source"] == "npz" and ident["shard_size"] == 1000 and ident["note"] == "t"
    assert ident["parts"] == [{"file": "gen.npz", "bytes": (tmp_path / "gen.npz").stat().st_size, "rows": 2500,
                               "sha256_head_tail": ident["parts"][0]["sha256_head_tail"]}]
    assert ident["order"] == "dealt-runs" and ident["order_seed"] == 0 and ident["run_rows"] == 15
    assert verify_store(store.root) == []


def test_class_sorted_file_gives_shards_of_every_class(tmp_path):
    """The published sets are concatenated class by class; each imported shard holds all classes about evenly."""
    images = np.zeros((2000, 32, 32, 3), np.uint8)
    labels = np.repeat(np.arange(10), 200)
    np.savez(tmp_path / "sorted.npz", image=images, label=labels)
    store = import_npz(tmp_path / "sorted.npz", tmp_path / "out", shard_size=500, num_classes=10)
    for path in store.shard_paths():
        labels = shards.read_table(store.root, ["label"], rows={path.name: np.arange(25)}).column("label")
        counts = np.bincount(shards.read_parquet(path, ["label"]).column("label").to_numpy(), minlength=10)
        run = store.manifest["identity"]["run_rows"]  # 7 rows: a class boundary splits at most two runs
        assert np.abs(counts - counts.sum() / 10).max() <= 2 * run, counts  # class-major order gives 500/0
        assert len(np.unique(labels)) >= 5  # and mixed within the shard: its first 25 rows are not one class


# One import in a fresh process (pyarrow's peak, `max_memory()`, cannot be reset), measured after a warm-up import
# (pyarrow imports pandas on first use, ~28 MB traced that is not ours). argv: npz, out dir, warm-up npz, shard size,
# mode ("stream" = the real importer, "whole" = the same importer fed a fully loaded array: the negative control).
_MEASURE = textwrap.dedent("""
    import json, sys, threading, tracemalloc
    import numpy as np, pyarrow as pa
    from raylab.data import npz_import
    npz, out, warm, shard, mode = sys.argv[1:]
    if mode == "whole":  # the importer fed the fully loaded array
        npz_import.Member.read_rows = lambda self, fd, rows: np.load(self.path)[
            "image" if len(self.shape) == 4 else "label"][rows]
    if mode == "mmap":  # the importer reading through one map of the whole file (the old importer)
        maps = {}
        npz_import.Member.read_rows = lambda self, fd, rows: np.array(
            maps.setdefault((self.path, self.offset), self.memmap())[rows])
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    npz_import.import_npz(warm, out + "-warm", shard_size=int(shard), num_classes=10)
    pool = pa.default_memory_pool()
    before, rss0, peak, done = pool.max_memory(), rss(), [0], threading.Event()
    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss())
    threading.Thread(target=sample, daemon=True).start()
    tracemalloc.start()
    npz_import.import_npz(npz, out, shard_size=int(shard), num_classes=10)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    print(json.dumps({"traced": traced, "arrow": pool.max_memory() - before, "rss": max(peak[0], rss()) - rss0}))
""")
SHARD, SMALL_N, BIG_N = 500, 4_000, 32_000
SLACK = 1 << 20  # 1 MiB, 2/3 of one shard's images: allocator noise, not a scaling term
RSS_SLACK = 8 << 20  # RSS moves by whole pages and allocator arenas


def _peaks(tmp_path, n: int, mode: str = "stream") -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / f"n{n}.npz"), str(tmp_path / f"{mode}{n}"),
                          str(tmp_path / "warm.npz"), str(SHARD), mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def _flat(small: dict[str, int], big: dict[str, int], keys=("traced", "arrow", "rss")) -> bool:
    """Peaks for 8x the images stay within 1.5x the small import's (plus slack), for both tracers and RSS."""
    return all(big[k] < 1.5 * small[k] + (RSS_SLACK if k == "rss" else SLACK) for k in keys)


def test_memory_does_not_grow_with_the_file(tmp_path):
    for n in (SMALL_N, BIG_N):
        make_npz(tmp_path / f"n{n}.npz", n)
    make_npz(tmp_path / "warm.npz", 10)
    small, big = _peaks(tmp_path, SMALL_N), _peaks(tmp_path, BIG_N)
    # Measured (shard 500 = 1.5 MB of images): traced 10.6 MB for 32k images, the shards in flight (WRITERS being
    # written, PREFETCH read ahead, one being read into its file-order buffer and gathered); pyarrow pool 2.4 MB.
    assert _flat(small, big), f"small {small}, big {big}"
    shard_bytes = SHARD * 3072
    in_flight = npz_import.PREFETCH + shards.WRITERS + 4
    assert big["traced"] < in_flight * shard_bytes and big["arrow"] < 8 * shard_bytes, big
    assert len(shards.ShardStore(tmp_path / f"stream{BIG_N}").shard_paths()) == BIG_N // SHARD
    # The checks can fail: the same importer on a fully loaded array peaks at 14.5 MB (4k) vs 101 MB (32k) traced;
    # reading through one map of the file, RSS grows with the file (the old importer: 3.1 GB for 1M rows).
    assert not _flat(_peaks(tmp_path, SMALL_N, "whole"), _peaks(tmp_path, BIG_N, "whole"), ("traced",))
    mapped_small, mapped_big = _peaks(tmp_path, SMALL_N, "mmap"), _peaks(tmp_path, BIG_N, "mmap")
    assert not _flat(mapped_small, mapped_big, ("rss",)), (mapped_small, mapped_big)


def test_rerun_skips_finished_shards(tmp_path):
    make_npz(tmp_path / "gen.npz", 300)
    store = import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=100, num_classes=10)
    inodes = {p.name: p.stat().st_ino for p in store.shard_paths()}
    import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=100, num_classes=10)
    assert {p.name: p.stat().st_ino for p in store.shard_paths()} == inodes  # nothing rewritten
    lost = store.root / shard_layout.shard_name(100, 199)
    lost.unlink()
    import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=100, num_classes=10)
    now = {p.name: p.stat().st_ino for p in store.shard_paths()}
    assert lost.exists() and {k: v for k, v in now.items() if k != lost.name} == {
        k: v for k, v in inodes.items() if k != lost.name}
    assert verify_store(store.root) == []


def test_other_shard_size_or_file_is_another_identity(tmp_path):
    make_npz(tmp_path / "gen.npz", 50)
    import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=20, num_classes=10)
    with pytest.raises(ShardError, match="identity"):
        import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=25, num_classes=10)
    make_npz(tmp_path / "gen.npz", 50, seed=1)
    with pytest.raises(ShardError, match="identity"):
        import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=20, num_classes=10)


def test_compressed_npz_is_refused(tmp_path):
    make_npz(tmp_path / "c.npz", 10, compressed=True)
    with pytest.raises(ShardError, match="compressed") as err:
        import_npz(tmp_path / "c.npz", tmp_path / "out", num_classes=10)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arrays, match", [
    ({"image": np.zeros((4, 32, 32, 3), np.uint8)}, "no array 'label'"),
    ({"image": np.zeros((4, 28, 28), np.uint8), "label": np.zeros(4, np.int64)}, "expected uint8 \\(N,32,32,3\\)"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(3, np.int64)}, "'label'"),
])
def test_malformed_npz_is_refused(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ShardError, match=match):
        import_npz(tmp_path / "bad.npz", tmp_path / "out", num_classes=10)
    with pytest.raises(ShardError, match="shard_size"):
        import_npz(tmp_path / "bad.npz", tmp_path / "out", shard_size=0, num_classes=10)


def test_labels_outside_the_datasets_classes_are_refused_before_a_store_exists(tmp_path):
    images = np.zeros((6, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "gen.npz", image=images, label=np.array([0, 3, 12, 9, 12, 1]))
    with pytest.raises(ShardError) as err:
        import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=2, num_classes=10)
    assert str(err.value) == (f"{tmp_path / 'gen.npz'}: label 12 (2 row(s)) is not a class of a 10-class dataset "
                              "(labels must lie in [0, 10)); set data.dataset to the dataset it was generated for")
    assert not (tmp_path / "out").exists()
    np.savez(tmp_path / "neg.npz", image=images, label=np.array([0, -1, 2, 3, 4, 5]))
    with pytest.raises(ShardError, match="label -1 \\(1 row\\(s\\)\\)"):
        import_npz(tmp_path / "neg.npz", tmp_path / "out", num_classes=10)
    assert not (tmp_path / "out").exists()
    store = import_npz(tmp_path / "gen.npz", tmp_path / "out", shard_size=2, num_classes=100)  # a CIFAR-100 file
    assert sorted(read_numpy(store.root)["label"].tolist()) == [0, 1, 3, 9, 12, 12]


def test_the_cli_takes_the_classes_from_data_dataset(tmp_path, capsys):
    from raylab.cli import main

    np.savez(tmp_path / "gen.npz", image=np.zeros((4, 32, 32, 3), np.uint8), label=np.array([0, 12, 1, 2]))
    assert main(["data", "import-npz", str(tmp_path / "gen.npz"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylab: error: ") and "label 12 (1 row(s)) is not a class of a 10-class dataset" in err
    assert "\n" not in err and not (tmp_path / "out").exists()
    assert main(["data", "import-npz", str(tmp_path / "gen.npz"), str(tmp_path / "out"),
                 "--set", "data.dataset=cifar100"]) == 0
    assert len(read_numpy(tmp_path / "out")["label"]) == 4


def test_memmap_reads_fortran_and_zip64_members(tmp_path):
    images = np.asfortranarray(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "f.npz", image=images, label=np.arange(5))
    got_images, got_labels = open_npz_arrays(tmp_path / "f.npz")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, np.arange(5))
    store = import_npz(tmp_path / "f.npz", tmp_path / "out", shard_size=2, num_classes=10)
    np.testing.assert_array_equal(read_numpy(store.root)["image"], images[store_sources([5], 2)])
    layout = Layout.of([5], 2, 0)
    ranges = layout.seed_ranges(layout.dealt())  # 5 rows over ceil(5 / 2) shards, the extra rows dealt at random
    assert layout.shards == 3 and ranges[0][0] == 0 and ranges[-1][1] == 4
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:])) and all(1 <= b - a + 1 <= 2 for a, b in ranges)


def _parts(tmp_path, sizes=(900, 1100, 1000, 1000)):
    """A set in parts concatenated class by class (the published 5M+ sets): each part holds a few classes."""
    rng = np.random.default_rng(3)
    n = sum(sizes)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), n // 10)
    paths, a = [], 0
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"part{i + 1}.npz")
        np.savez(paths[-1], image=images[a:a + size], label=labels[a:a + size])
        a += size
    return paths, images, labels


def test_parts_make_one_store_whose_every_shard_holds_every_class(tmp_path):
    paths, images, labels = _parts(tmp_path)
    store = import_npz(paths, tmp_path / "out", shard_size=1000, num_classes=10)
    got = read_numpy(store.root)
    order = store_sources([900, 1100, 1000, 1000], 1000)  # store row k is row order[k] of the parts concatenated
    np.testing.assert_array_equal(got["image"], images[order])
    np.testing.assert_array_equal(got["label"], labels[order])
    ident = store.manifest["identity"]
    assert [p["file"] for p in ident["parts"]] == ["part1.npz", "part2.npz", "part3.npz", "part4.npz"]
    assert [p["rows"] for p in ident["parts"]] == [900, 1100, 1000, 1000]
    for path in store.shard_paths():  # part 1 alone holds classes 0-2: every shard still gets all ten evenly
        counts = np.bincount(shards.read_parquet(path, ["label"]).column("label").to_numpy(), minlength=10)
        assert np.abs(counts - counts.sum() / 10).max() <= 2 * ident["run_rows"], counts
    assert verify_store(store.root) == []


def test_the_import_reads_runs_of_rows_not_single_rows(tmp_path, monkeypatch):
    """One pread per run of run_rows rows (~2 per run: images and labels), not one per row (1.5 min per 1M rows)."""
    paths, _, _ = _parts(tmp_path)
    calls = []
    real = npz_import.os.preadv
    monkeypatch.setattr(npz_import.os, "preadv", lambda *a: calls.append(1) or real(*a))
    store = import_npz(paths, tmp_path / "out", shard_size=1000, num_classes=10)
    run = store.manifest["identity"]["run_rows"]
    assert run == 15 and len(calls) <= 2 * (4000 / run + 4 * len(store.shard_paths())), len(calls)


def test_a_rerun_writes_only_the_missing_shards_and_other_parts_are_refused_in_one_line(tmp_path):
    paths, _, _ = _parts(tmp_path)
    store = import_npz(paths, tmp_path / "out", shard_size=500, num_classes=10)
    inodes = {p.name: p.stat().st_ino for p in store.shard_paths()}
    lost = store.shard_paths()[3]
    lost.unlink()
    import_npz(paths, tmp_path / "out", shard_size=500, num_classes=10)
    now = {p.name: p.stat().st_ino for p in store.shard_paths()}
    assert lost.exists() and {k: v for k, v in now.items() if k != lost.name} == {
        k: v for k, v in inodes.items() if k != lost.name}
    np.savez(paths[2], image=np.zeros((1000, 32, 32, 3), np.uint8), label=np.zeros(1000, np.int64))
    with pytest.raises(ShardError, match=r"part\(s\) \['part3.npz'\] differ in name, size or content") as err:
        import_npz(paths, tmp_path / "out", shard_size=500, num_classes=10)
    assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match="a part is named twice"):
        import_npz([paths[0], paths[0]], tmp_path / "other", num_classes=10)


def test_the_cli_imports_several_parts_into_one_store(tmp_path, capsys):
    from raylab import cli

    paths, _, _ = _parts(tmp_path)
    assert cli.main(["data", "import-npz", *map(str, paths), str(tmp_path / "out"), "--shard-size", "800"]) == 0
    assert "4000 rows from 4 part(s) in 5 shards" in capsys.readouterr().out
