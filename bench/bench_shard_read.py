"""Read speed of the shard image column by Arrow type, measured side by side in one run.

    python bench/bench_shard_read.py [--images 50000] [--shard-size 10000] [--repeats 3]

Writes the same random 32×32×3 uint8 images three times, as `binary`, `fixed_size_binary(3072)` and
`list<uint8>` (what a naive numpy → Arrow conversion gives), with the shard writer's Parquet options, then
measures images/s for:

* pyarrow: `pq.read_table` per shard file + decode to (N,32,32,3) uint8;
* Ray Data: `read_parquet` → `iter_batches(1024, batch_format="pyarrow")` → decode → float32 NCHW tensor
  (the training input path);
* raylab: `read_numpy` on a real store of the chosen type, with and without sha256 verification.

Result that chose `shards.IMAGE_TYPE` (50k images, 5 shards, 2-core CPU box, Ray num_cpus=2, medians of 3):
see the reply/notes of the shard-store task; rerun to refresh.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raylab.data import shards  # noqa: E402


def _list_array(images: np.ndarray) -> pa.Array:
    flat = pa.array(images.reshape(-1), type=pa.uint8())
    return pa.ListArray.from_arrays(pa.array(np.arange(len(images) + 1, dtype=np.int32) * shards.IMAGE_BYTES), flat)


def _decode_list(col: pa.ChunkedArray) -> np.ndarray:
    parts = [c.flatten().to_numpy(zero_copy_only=True) for c in col.chunks]
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(-1, *shards.IMAGE_SHAPE)


# variant name → (encode (N,32,32,3) uint8 → pa.Array, decode column → (N,32,32,3) uint8)
VARIANTS: dict[str, tuple[Callable[[np.ndarray], pa.Array], Callable]] = {
    "binary": (lambda x: shards.encode_images(x, pa.binary()), shards.decode_images),
    "fixed_size_binary(3072)": (lambda x: shards.encode_images(x, pa.binary(3072)), shards.decode_images),
    "list<uint8>": (_list_array, _decode_list),
}


def write_variant(root: Path, images: np.ndarray, shard_size: int, encode: Callable) -> list[str]:
    root.mkdir(parents=True)
    paths = []
    for start in range(0, len(images), shard_size):
        block = images[start:start + shard_size]
        n = len(block)
        table = pa.table({"image": encode(block), "label": pa.array(np.zeros(n, np.int16)),
                          "seed": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          "class_cond": pa.array(np.full(n, -1, np.int16))})
        paths.append(str(root / shards.shard_name(start, start + n - 1)))
        shards.write_shard_file(table, paths[-1])
    return paths


def time_pyarrow(paths: list[str], decode: Callable) -> int:
    n = 0
    for p in paths:
        n += len(decode(pq.read_table(p, columns=["image"]).column("image")))
    return n


def time_ray(paths: list[str], decode: Callable, v2: bool = False) -> int:
    import ray.data

    read = ray.data.read_parquet if v2 else shards.ray_read_parquet  # V1 unless --ray-v2 (see ray_read_parquet)
    return iterate_ray(read(paths, columns=["image"]), decode)


def iterate_ray(ds, decode: Callable) -> int:
    """The training input path: 1024-row Arrow batches → uint8 HWC → float32 NCHW in [0, 1]."""
    import torch

    n = 0
    for batch in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
        x = torch.from_numpy(decode(batch.column("image"))).permute(0, 3, 1, 2).float().div_(255)
        n += x.shape[0]
    return n


def rate(fn: Callable[[], int], repeats: int, warmup: bool = False) -> float:
    """Median images/s over `repeats` timed calls."""
    if warmup:
        fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_store(root: Path, images: np.ndarray, shard_size: int, repeats: int) -> dict[str, float]:
    store = shards.ShardStore(root).create_or_open({"bench": "shard_read"})
    for start in range(0, len(images), shard_size):
        n = len(images[start:start + shard_size])
        store.write_shard(start, start + n - 1, {"image": images[start:start + n], "label": np.zeros(n, np.int16),
                                                  "seed": np.arange(start, start + n), "class_cond": np.full(n, -1)})
    rates = {f"read_numpy(verify={v})": rate(lambda v=v: len(shards.read_numpy(root, ["image"], verify=v)["image"]),
                                             repeats) for v in (False, True)}
    read = lambda: iterate_ray(shards.read_dataset(root, ["image"], verify=True), shards.decode_images)  # noqa: E731
    return rates | {"read_dataset(verify=True)": rate(read, repeats, warmup=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: all cores)")
    ap.add_argument("--ray-v2", action="store_true", help="Ray's default V2 Parquet datasource instead of V1")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*not writable.*")  # zero-copy views are read-only by design

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    images = np.random.default_rng(0).integers(0, 256, (args.images, *shards.IMAGE_SHAPE), dtype=np.uint8)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (encode, decode) in VARIANTS.items():
            paths = write_variant(Path(tmp) / name.split("(")[0], images, args.shard_size, encode)
            mb = sum(os.path.getsize(p) for p in paths) / 1e6
            rows[name] = (rate(lambda: time_pyarrow(paths, decode), args.repeats),
                          rate(lambda: time_ray(paths, decode, args.ray_v2), args.repeats, warmup=True), mb)
        store_rates = bench_store(Path(tmp) / "store", images, args.shard_size, args.repeats)
    ray.shutdown()
    report(rows, store_rates, args)


def report(rows: dict, store_rates: dict, args: argparse.Namespace) -> None:
    base_pa, base_ray, _ = rows["list<uint8>"]
    print(f"\n{args.images} images, shards of {args.shard_size}, median of {args.repeats}, Ray Parquet datasource "
          f"{'V2' if args.ray_v2 else 'V1'}; ratios vs list<uint8>")
    print(f"{'image type':<26}{'pyarrow img/s':>15}{'×':>7}{'Ray Data img/s':>16}{'×':>7}{'MB':>8}")
    for name, (r_pa, r_ray, mb) in rows.items():
        print(f"{name:<26}{r_pa:>15,.0f}{r_pa / base_pa:>7.2f}{r_ray:>16,.0f}{r_ray / base_ray:>7.2f}{mb:>8.1f}")
    b, f = rows["binary"], rows["fixed_size_binary(3072)"]
    print(f"binary / fixed_size_binary: pyarrow {b[0] / f[0]:.2f}×, Ray Data {b[1] / f[1]:.2f}×")
    print(f"raylab store (IMAGE_TYPE={shards.IMAGE_TYPE}, read + concatenate + decode):")
    for name, r in store_rates.items():
        print(f"  {name:<24}{r:>15,.0f} img/s")


if __name__ == "__main__":
    main()
