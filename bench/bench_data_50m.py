"""The reference's largest published set, 50M images in 4 parts, imported, selected and streamed: start-up time,
driver and worker RSS, rows read per rank at 2, 4, 8, 64 and 128 workers (whole store and a top-20% view), and the
import's rows/s.

    python bench/bench_data_50m.py [--rows 50000000] [--parts 4] [--real ROWS] [--dir DIR] [--keep] [--skip-worker]

The parts are reference-format `.npz` files of constant (all-zero) images whose image bytes are holes of sparse
files (tests/data/npz_parts.py: 154 GB apparent, a few MB on disk), concatenated class by class as the published
sets are; Parquet stores the constant images in ~2.5 MB per 10,000-row shard. Each phase runs in a fresh process
(its peak RSS is its own):

1. import: `import_npz(parts, store, num_classes=10)` (what `raylab data import-npz P1 P2 P3 P4 STORE` runs):
   rows/s, CPU seconds, peak RSS. Reading a hole costs the kernel a zero-filled page, not a disk read; a real 154 GB set reads 48 KB
   runs from disk instead (one pread per 16 rows).
2. select: `build_view(store, select.policy=none)`, the view training streams (time, peak RSS); and a top-20% view
   (`tests/data/top_view.py`: the real per-class top fraction over seeded random scores, as the store has none,
   so the kept rows are scattered over every row group as a scorer's are).
3. start-up: what a training driver does before Ray starts, `generated_input(view)` (row index: built beside the
   view on first use, memory-mapped after; every shard checked on a stat) and pickling the Train loop config; the
   first start (builds the index) and a second one; also on the whole store, and on the top-20% view (its first
   start writes its compact copy, `raylab.pipeline.compact`).
4. reads: per rank, the rows it takes and the rows of the row groups it reads over the first 100 windows of a pass
   (6.6M rows; all of a top-20% view's), at 2, 4, 8, 64 and 128 workers (9 ranks spread over the world at 64 and
   128), global batch 2048 x 0.8 generated (Wang et al. 2023 at 20M+: 1,638 rows a step): the policy-none view, the
   top-20% view read from its compact copy, and the same view read in place (its index over the store's shards,
   what training read before); and for one rank, the same counted on real reads of 3 windows.
5. worker: 2 Ray Train workers stream 100 batches each of 819 generated rows through the Ray Data ingest: RSS of
   each worker before and at its peak, against its window share (WINDOW_ROWS / 2 rows of 3,072 bytes).
6. with --real ROWS: the import of ROWS random images from 4 parts written to disk and dropped from the page cache
   (3 KB a row on disk, twice while writing), and one pread per row (the old importer's reads) on the same part.

Measured on the 2-core dev box shared with other jobs (`--real 1000000`, 2026-12-07; load average 9-15):

    import 50M in 4 parts     86,201 rows/s wall (168K in an earlier run at load 5-13), 188K rows per CPU-second,
                              peak RSS 416 MB, 5,000 shards, 12.7 GB
    select (policy none)      71 s (31 s at lower load), peak RSS 3.9 GB
    start-up, view            1.8 s and 625 MB peak the first time (builds the index: 1.1 GB rows.npz hashed and
                              mapped), 0.3 s and 91 MB after; the whole store 0.1-0.2 s, 92-97 MB; loop config 97 B
    replaced                  the per-shard mask index 87 s, sha256 of every shard 261 s for the real 154 GB
    rows read / consumed      max over ranks 1.008 (2 workers), 1.030 (4), 1.060 (8) (before the changes below)

`--rows 10000000 --skip-worker` (2026-12-07, load average 14-54 on the 2 cores: 50M did not fit the time), rows
read / consumed over the first 100 windows of a pass (6.6M rows; the 2M-row top-20% view's whole pass), max over
the ranks counted (all ranks up to 8; 9 of 64 and of 128), windows of 65,536 rows:

    world                     2      4      8      64     128
    policy-none view          1.003  1.014  1.031  1.263  1.518
    top-20% view, compact     1.004  1.016  1.033  1.297  1.548
    top-20% view, in place    5.009  5.039  5.083  5.563  6.310   (what training read before the compact copy)
    top-20% first start       138 s, driver peak RSS 444 MB (writes the 2M-row compact copy from the 10M-row
                              store); 0.1 s and 75 MB after
    (`--rows 2000000`: 1.004 / 1.016 / 1.033 / 1.297 / 1.548 none, 1.005 / 1.017 / 1.038 / 1.331 / 1.564 compact,
    5.02 / 5.07 / 5.09 / 5.60 / 6.37 in place; first start 19 s.) Before the proportional split of a batch over two
    windows and the 65,536-row window, the whole store read 2.30x at 64 ranks and 3.54x at 128 (2M rows, 20 windows).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # raylab and tests.data.npz_parts from the checkout

import numpy as np  # noqa: E402

from raylab.data.mix import WINDOW_ROWS  # noqa: E402

GLOBAL_GENERATED = 1638  # 2048 - round(0.2 * 2048): the paper's batch above 1M generated images
WORLDS = (2, 4, 8, 64, 128)
RANKS_COUNTED = 9  # ranks spread over a world of more
READ_WINDOWS = 100


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss keeps the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _stats(start: float, **extra) -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - start, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": peak_rss_mb(),
            "load": os.getloadavg()[0], **extra}


def phase_import(d: Path, parts: list[str]) -> dict:
    from raylab.data.npz_import import import_npz

    start = time.perf_counter()
    store = import_npz(parts, d / "store", num_classes=10)
    rows = sum(e["rows"] for e in store.manifest["shards"].values())
    disk = sum(p.stat().st_size for p in store.shard_paths())
    return _stats(start, rows=rows, shards=len(store.shard_paths()), store_gb=disk / 1e9)


def phase_select(d: Path) -> dict:
    from raylab.config import SelectConfig
    from raylab.pipeline.select import build_view

    start = time.perf_counter()
    view = build_view(d / "store", SelectConfig(policy="none"), d / "view")
    return _stats(start, rows=len(view))


def phase_startup(target: Path) -> dict:
    from raylab.pipeline.generated_input import generated_input

    start = time.perf_counter()
    generated = generated_input(target)
    loop_config = pickle.dumps({"generated": generated.rows})  # what TorchTrainer ships to every worker
    return _stats(start, rows=len(generated.rows), loop_config_bytes=len(loop_config))


def rank_reads(index, world: int) -> list[tuple[int, int]]:
    """(rows taken, rows read) over the first READ_WINDOWS windows of a pass, of RANKS_COUNTED ranks of `world`."""
    from raylab.data.mix import GeneratedStream

    out = []
    for rank in sorted(set(np.linspace(0, world - 1, min(world, RANKS_COUNTED)).astype(int).tolist())):
        plan = GeneratedStream(index, GLOBAL_GENERATED // world, seed=0, rank=rank, world=world).pass_plan()
        taken, read = np.sum([plan.reads(w) for w in plan.windows[:READ_WINDOWS]], axis=0)
        out.append((int(taken), int(read)))
    return out


def in_place_index(view: Path):
    """A view's row index over its store's shards, as training read a sparse view before its compact copy."""
    from raylab.data.row_index import RowIndex
    from raylab.pipeline.generated_input import _build_view_index
    from raylab.pipeline.select import view_meta

    folder, meta = view_meta(view)
    info, blocks, arrays = _build_view_index(folder, meta)
    return RowIndex(tuple(str(Path(meta["store"]) / n) for n in info["files"]), blocks, info["rows"],
                    np.asarray(arrays["row"][0]), np.asarray(arrays["label"][0]))


def phase_reads(d: Path) -> dict:
    from raylab.data import mix
    from raylab.data.mix import GeneratedStream
    from raylab.pipeline.generated_input import open_generated

    index = open_generated(d / "view")
    indexes = {"view": index, "top20": open_generated(d / "top20"), "top20-in-place": in_place_index(d / "top20")}
    out = {name: {world: rank_reads(rows, world) for world in WORLDS} for name, rows in indexes.items()}
    counted = []
    real = mix.read_parquet
    mix.read_parquet = lambda *a, **k: counted.append(real(*a, **k).num_rows) or real(*a, **k)
    plan = GeneratedStream(index, GLOBAL_GENERATED // 4, seed=0, rank=1, world=4).pass_plan()
    got = sum(mix.read_window(plan.for_window(w), w).num_rows for w in plan.windows[:3])
    planned = np.sum([plan.reads(w) for w in plan.windows[:3]], axis=0).tolist()
    return {"per_rank": out, "real": {"taken": got, "read": sum(counted), "planned": planned}}


def phase_select_top(d: Path) -> dict:
    from tests.data.top_view import write_top_view

    start = time.perf_counter()
    view = write_top_view(d / "store", d / "top20")
    return _stats(start, rows=len(view))


def phase_worker(d: Path) -> dict:
    from raylab.cluster import init_ray
    from raylab.config import to_flat
    from raylab.pipeline.generated_input import generated_input
    from raylab.presets import make_config
    from raylab.raytrain import make_trainer
    from raylab.runs import run_dir

    cfg = make_config("paper", {"train.batch_size": 2048, "train.ratio": 0.2, "resources.num_workers": 2,
                                "resources.use_gpu": False, "resources.cpus_per_worker": 1,
                                "resources.max_failures": 0, "tracking.root": str(d / "runs")})
    init_ray()
    generated = generated_input(d / "view")
    make_trainer(_stream_worker, {"flat": to_flat(cfg), "generated": generated.rows, "batches": 100, "out": str(d)},
                 cfg, run_dir(cfg, "bench", "stream-50m")).fit()
    return {"workers": [json.loads((d / f"worker-{r}.json").read_text()) for r in range(2)]}


def _stream_worker(loop_config: dict) -> None:
    """A Train worker streaming its generated batches as training does (no model), sampling its own memory."""
    import psutil

    from raylab.config import from_flat
    from raylab.raytrain import rank_and_world
    from raylab.train.ingest import generated_stream

    rank, world = rank_and_world()
    proc = psutil.Process()
    before = proc.memory_info()
    stream = generated_stream(from_flat(loop_config["flat"]), loop_config["generated"], rank, world)
    peak, start = [0, 0], time.perf_counter()
    for i in range(loop_config["batches"]):
        stream.next_batch()
        if i == 0:
            first = time.perf_counter()  # Ray Data's start of the pass, paid once per pass
        m = proc.memory_info()
        peak = [max(peak[0], m.rss), max(peak[1], m.rss - m.shared)]
    rows = (loop_config["batches"] - 1) * stream.batch
    result = {"rank": rank, "rss_before_mb": before.rss / 2**20, "rss_peak_mb": peak[0] / 2**20,
              "private_peak_mb": peak[1] / 2**20, "rows": rows, "first_s": first - start,
              "rows_s": rows / (time.perf_counter() - first), "window_share_mb": WINDOW_ROWS // world * 3072 / 2**20}
    Path(loop_config["out"], f"worker-{rank}.json").write_text(json.dumps(result))


def phase_legacy(d: Path) -> dict:
    """What the replaced start-up cost, on 20 of the shards, extrapolated to all: the row index built with one
    boolean mask over all N rows per shard (RowIndex.from_positions, View.rows), and the sha256 of every shard at
    every start (here 12.7 GB of constant-image shards; the real set's shards are 154 GB)."""
    from raylab.data.npz_import import npz_members
    from raylab.io import sha256_file

    shard = npz_members(d / "view" / "rows.npz", ("shard",))["shard"]
    shards = int(shard[-1]) + 1
    start = time.perf_counter()
    for i in range(20):
        np.flatnonzero(shard == i)
    mask_s = (time.perf_counter() - start) / 20 * shards
    paths = sorted((d / "store").glob("gen-*.parquet"))[:20]
    start = time.perf_counter()
    for p in paths:
        sha256_file(p)
    seconds = time.perf_counter() - start
    per_byte = seconds / sum(p.stat().st_size for p in paths)
    store_bytes = sum(p.stat().st_size for p in (d / "store").glob("gen-*.parquet"))
    return {"index_s": mask_s, "hash_s": per_byte * store_bytes, "hash_real_s": per_byte * 153.6e9,
            "hash_mb_s": 1 / per_byte / 1e6}


def write_random_parts(d: Path, rows: int, parts: int) -> list[Path]:
    """Parts of random images, class-sorted labels, written by np.savez from a memory map (streamed, bounded
    memory), synced and dropped from the page cache: an import that reads them reads the disk."""
    labels, paths = np.repeat(np.arange(10, dtype=np.int64), rows // 10), []
    rng = np.random.default_rng(0)
    for i, part in enumerate(np.array_split(labels, parts)):
        raw = np.lib.format.open_memmap(d / "raw.npy", mode="w+", dtype=np.uint8, shape=(len(part), 32, 32, 3))
        for a in range(0, len(part), 50_000):
            raw[a:a + 50_000] = rng.integers(0, 256, raw[a:a + 50_000].shape, dtype=np.uint8)
        paths.append(d / f"real{i + 1}.npz")
        np.savez(paths[-1], image=raw, label=part)
        del raw
        (d / "raw.npy").unlink()
    for path in paths:
        drop_cache(path)
    return paths


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def phase_real_import(d: Path) -> dict:
    """The import of the random parts (`write_random_parts`), read from disk."""
    from raylab.data.npz_import import import_npz

    paths = sorted(d.glob("real*.npz"))
    start = time.perf_counter()
    store = import_npz(paths, d / "real-store", num_classes=10)
    out = _stats(start, rows=sum(e["rows"] for e in store.manifest["shards"].values()))
    shutil.rmtree(store.root)
    return out


def phase_real_per_row(d: Path) -> dict:
    """The old importer's reads for comparison: one pread per row, in a random order, on the same (dropped) part."""
    from raylab.data.npz_import import open_npz

    path = sorted(d.glob("real*.npz"))[0]
    drop_cache(path)
    images, _ = open_npz(path)
    sample = np.random.default_rng(1).permutation(images.shape[0])[:20_000]
    fd, start = os.open(path, os.O_RDONLY), time.perf_counter()
    for row in sample.tolist():
        os.pread(fd, images.row_bytes, images.offset + row * images.row_bytes)
    os.close(fd)
    return {"rows_s": len(sample) / (time.perf_counter() - start)}


PHASES = {"import": lambda d, a: phase_import(d, a), "select": lambda d, a: phase_select(d),
          "select-top20": lambda d, a: phase_select_top(d), "startup-top20": lambda d, a: phase_startup(d / "top20"),
          "startup-view": lambda d, a: phase_startup(d / "view"),
          "startup-store": lambda d, a: phase_startup(d / "store"),
          "reads": lambda d, a: phase_reads(d), "worker": lambda d, a: phase_worker(d),
          "legacy": lambda d, a: phase_legacy(d), "real-parts": lambda d, a: write_random_parts(d, int(a[0]), 4),
          "real-import": lambda d, a: phase_real_import(d), "real-per-row": lambda d, a: phase_real_per_row(d)}


def run_phase(name: str, d: Path, extra: list[str]) -> dict:
    """One phase in a fresh process: its own peak RSS and CPU time."""
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(d), *extra],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_parts(d: Path, rows: int, parts: int) -> list[str]:
    from tests.data.npz_parts import write_constant_npz

    labels = np.repeat(np.arange(10, dtype=np.int64), rows // 10)
    return [str(write_constant_npz(d / f"part{i + 1}.npz", part))
            for i, part in enumerate(np.array_split(labels, parts))]


def report(r: dict, rows: int) -> None:
    imp, sel = r["import"], r["select"]
    print(f"1. import {rows:,} rows in 4 parts: {imp['wall_s']:.0f} s = {rows / imp['wall_s']:,.0f} rows/s wall, "
          f"{rows / imp['cpu_s']:,.0f} rows per CPU-second ({imp['cpu_s']:.0f} CPU s), peak RSS "
          f"{imp['maxrss_mb']:.0f} MB, {imp['shards']} shards, {imp['store_gb']:.1f} GB, load average "
          f"{imp['load']:.1f} on 2 cores")
    print(f"2. select (policy none): {sel['wall_s']:.0f} s, peak RSS {sel['maxrss_mb']:.0f} MB")
    top = r["select-top20"]
    print(f"2. select (top 20% per class, random scores): {top['wall_s']:.0f} s, peak RSS {top['maxrss_mb']:.0f} MB, "
          f"{top['rows']:,} rows")
    for key in ("startup-view-1", "startup-view-2", "startup-store-1", "startup-store-2", "startup-top20-1",
                "startup-top20-2"):
        s = r[key]
        print(f"3. start-up {key[8:]:8s}: {s['wall_s']:6.1f} s, driver peak RSS {s['maxrss_mb']:6.0f} MB, loop "
              f"config {s['loop_config_bytes']} bytes")
    old = r["legacy"]
    print(f"   replaced: the per-shard mask index {old['index_s']:.0f} s, sha256 of every shard at every start "
          f"{old['hash_s']:.0f} s here ({old['hash_mb_s']:.0f} MB/s; {old['hash_real_s']:.0f} s for the real 154 GB), "
          "extrapolated from 20 shards")
    for name, worlds in r["reads"]["per_rank"].items():
        for world, ranks in worlds.items():
            ratios = [read / taken for taken, read in ranks]
            print(f"4. {name:14s} world {world:>3}: rows read / rows consumed per rank over {READ_WINDOWS} windows: "
                  f"max {max(ratios):.3f}, mean {np.mean(ratios):.3f} ({len(ranks)} ranks; {ranks[0][0]:,} rows "
                  "consumed by rank 0)")
    real = r["reads"]["real"]
    print(f"   real reads, rank 1 of 4, 3 windows: took {real['taken']:,}, read {real['read']:,} "
          f"(plan: {real['planned']})")
    for w in r.get("worker", {}).get("workers") or []:
        print(f"5. worker {w['rank']}: RSS {w['rss_before_mb']:.0f} MB before, peak {w['rss_peak_mb']:.0f} MB "
              f"(private {w['private_peak_mb']:.0f} MB; its window share {w['window_share_mb']:.0f} MB); first batch "
              f"{w['first_s']:.1f} s, then {w['rows']:,} rows at {w['rows_s']:,.0f} rows/s")
    if "real" in r:
        real = r["real"]
        print(f"6. import {real['rows']:,} random images from 4 parts on disk (page cache dropped): "
              f"{real['rows'] / real['wall_s']:,.0f} rows/s wall, {real['rows'] / real['cpu_s']:,.0f} rows per "
              f"CPU-second, peak RSS {real['maxrss_mb']:.0f} MB, load average {real['load']:.1f}; one pread per "
              f"row (the old importer's reads) on the same part: {real['per_row']['rows_s']:,.0f} rows/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the store, view and parts")
    ap.add_argument("--skip-worker", action="store_true")
    ap.add_argument("--real", type=int, default=0, metavar="ROWS",
                    help="also import ROWS random images from 4 parts on disk, page cache dropped (3 KB a row)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("parts_given", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](Path(args.dir), args.parts_given), default=str))  # the last line
        return
    d = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_50m-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        parts = write_parts(d, args.rows, args.parts)
        results = {"import": run_phase("import", d, parts)}
        for part in parts:
            Path(part).unlink()
        results["select"] = run_phase("select", d, [])
        results["select-top20"] = run_phase("select-top20", d, [])
        for target in ("view", "store", "top20"):
            for n in (1, 2):
                results[f"startup-{target}-{n}"] = run_phase(f"startup-{target}", d, [])
        results["reads"] = run_phase("reads", d, [])
        results["legacy"] = run_phase("legacy", d, [])
        if not args.skip_worker:
            results["worker"] = run_phase("worker", d, [])
        if args.real:
            run_phase("real-parts", d, [str(args.real)])
            results["real"] = run_phase("real-import", d, []) | {"per_row": run_phase("real-per-row", d, [])}
        print(json.dumps(results, default=str))
        report(results, args.rows)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
