"""Adversarial training on Ray Train: step overhead, ingest headroom and flat ingest memory, in one run.

Three measurements, printed side by side as figures and ratios:

1. The TRADES step (WRN-16-2 SiLU, PGD-k, `train.augment` none, original images only, `paper` preset otherwise)
   in the driver process vs the same step inside a 1-worker `TorchTrainer`, same thread count, plus the one
   `ray.train.report` per epoch that training pays (it can block ~2 s: reference/ray_mlflow.md §1).
2. Ingest alone, no model: inside a 1-worker `TorchTrainer`, `mixed_batches` over an `OriginalStream` and the
   training's `GeneratedStream` (ratio 0.3 of batch 128; `raylab.train.ingest`: each pass read through Ray Data in
   its own random window order) for one full pass over a generated store, decoded to uint8 NHWC and converted by
   `to_input`; headroom = ingest img/s / step img/s (should be >> 1).
3. The worker's memory over that pass for N and 10×N generated rows (RSS growth during the pass, and the
   process's peak RSS): the stream never holds the generated set, so 10×N / N should stay ≈ 1. The object-store
   pages the worker reads count in its RSS too; `resources.ingest_object_store_mb` bounds them, and a last row
   shows 10×N without that budget.

    python bench/bench_train_ray.py [--batch 128] [--steps 10] [--iters 6] [--threads 2] [--rows 5000] [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from raylab.cluster import init_ray  # noqa: E402
from raylab.config import ExperimentConfig, from_flat, override, to_flat  # noqa: E402
from raylab.presets import make_config  # noqa: E402
from raylab.data.mix import WINDOW_ROWS, OriginalStream, split_batch  # noqa: E402
from raylab.data.shards import ShardStore  # noqa: E402
from raylab.models import create_model  # noqa: E402
from raylab.raytrain import make_trainer, report  # noqa: E402
from raylab.runs import run_dir  # noqa: E402
from raylab.train.ema import WeightAverage  # noqa: E402
from raylab.train.loop import Batch, TrainContext, mixed_batches, to_input, train_step  # noqa: E402
from raylab.train.optim import build_optimizer  # noqa: E402
from raylab.train.schedules import build_scheduler  # noqa: E402
from raylab.pipeline.generated_input import open_generated  # noqa: E402
from raylab.train.ingest import generated_stream  # noqa: E402

INGEST_BATCH, INGEST_RATIO = 128, 0.3  # the paper's mix (Wang et al. 2023: 0.3 original)
SHARD_ROWS = 5_000
ORIGINAL_ROWS = 50_000  # CIFAR-10's training set size; the same array for N and 10×N, so it cancels out
QUICK = {"batch": 32, "steps": 2, "iters": 2, "rows": 1_000}
CPU = torch.device("cpu")


def random_batch(n: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


# ---------------------------------------------------------------------------------------------------------------
# 1. The training step, in the driver and under TorchTrainer.

def bench_config(args: argparse.Namespace, root: str) -> ExperimentConfig:
    return make_config("paper", {"model.name": "wrn-16-2", "train.batch_size": args.batch, "attack.steps": args.steps,
                                 "train.augment": "none", "resources.num_workers": 1, "resources.use_gpu": False,
                                 "resources.cpus_per_worker": args.threads, "resources.max_failures": 0,
                                 "tracking.root": root})


def make_context(cfg: ExperimentConfig, device: torch.device, steps: int = 100) -> TrainContext:
    """The context both sides time: same seed, model, optimizer, schedule and EMA as training builds."""
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                         activation=cfg.model.activation).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train, cfg.train.batch_size)
    ema = WeightAverage.from_config(model, cfg.train, steps)
    return TrainContext(model, opt, build_scheduler(opt, cfg.train, steps), ema, cfg.train, cfg.attack, 10, device,
                        torch.Generator(device=device).manual_seed(0))


def time_steps(ctx: TrainContext, iters: int) -> float:
    """Seconds per step after one warm-up step."""
    images, labels = random_batch(ctx.train.batch_size)
    train_step(ctx, images, labels)
    start = time.perf_counter()
    for _ in range(iters):
        train_step(ctx, images, labels)
    return (time.perf_counter() - start) / iters


def step_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """Inside the Train worker: the same step, then the one report per epoch that training makes."""
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])
    ctx = make_context(from_flat(loop_config["flat"]), ray.train.torch.get_device())
    step_s = time_steps(ctx, loop_config["iters"])
    start = time.perf_counter()
    report({"step_s": step_s})
    return {"step_s": step_s, "report_s": time.perf_counter() - start}


def fit(fn: Callable, loop_config: dict, cfg: ExperimentConfig, name: str) -> dict:
    trainer = make_trainer(fn, {"flat": to_flat(cfg), **loop_config}, cfg, run_dir(cfg, "bench", name))
    return trainer.fit().return_value


# ---------------------------------------------------------------------------------------------------------------
# 2 + 3. Ingest throughput and worker memory over one pass of the generated rows.

def write_store(root: Path, rows: int, shard_rows: int) -> Path:
    """`rows` random 32×32×3 images in shards of `shard_rows`; seed = row index, class_cond = label."""
    store = ShardStore(root).create_or_open({"bench": "random-uint8", "rows": rows})
    for first in range(0, rows, shard_rows):
        last = min(first + shard_rows, rows) - 1
        images, labels = random_batch(last - first + 1, seed=first)
        store.write_shard(first, last, {"image": images, "label": labels.astype(np.int16),
                                        "seed": np.arange(first, last + 1), "class_cond": labels.astype(np.int16)})
    return store.root


def memory(proc: psutil.Process) -> np.ndarray:
    """[RSS, private RSS] in bytes; psutil's `shared` is file and shared-memory pages (the object store's too)."""
    m = proc.memory_info()
    return np.array([m.rss, m.rss - m.shared])


def memory_stats(before: np.ndarray, samples: np.ndarray) -> dict[str, float]:
    """Growth over the pass, and over its 2nd half alone: a bounded buffer fills early, a leak keeps growing."""
    half = len(samples) // 2
    return {"rss_before": before[0], "rss_growth": samples[:, 0].max() - before[0],
            "private_growth": samples[:, 1].max() - before[1],
            "late_growth": max(samples[half:, 1].max() - samples[:half, 1].max(), 0),
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def drain(batches: Iterable[Batch]) -> dict[str, float]:
    """Consume batches as training would (to float input), sampling this process's memory after each one."""
    proc = psutil.Process()
    before, samples = memory(proc), []
    images, first_s, start = 0, 0.0, time.perf_counter()
    for x, y in batches:
        to_input(x, CPU)
        images += len(y)
        first_s = first_s or time.perf_counter() - start
        samples.append(memory(proc))
    seconds = time.perf_counter() - start
    return {"rate": images / seconds, "steady_rate": (images - INGEST_BATCH) / max(seconds - first_s, 1e-9),
            "first_s": first_s, **memory_stats(before, np.stack(samples))}


def ingest_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    torch.set_num_threads(loop_config["threads"])
    n_orig, n_gen = split_batch(INGEST_BATCH, INGEST_RATIO)
    images, labels = random_batch(loop_config["original_rows"])
    original = OriginalStream(len(labels), n_orig, seed=0)
    cfg = override(from_flat(loop_config["flat"]), {"train.batch_size": INGEST_BATCH, "train.ratio": INGEST_RATIO})
    generated = generated_stream(cfg, loop_config["index"], 0, 1)
    steps = loop_config["rows"] // n_gen  # one full pass over the generated rows
    return drain(mixed_batches(original, generated, images, labels, steps))


def ingest(cfg: ExperimentConfig, store: Path, rows: int, threads: int, original_rows: int) -> dict[str, float]:
    budget = cfg.resources.ingest_object_store_mb
    return fit(ingest_worker, {"rows": rows, "threads": threads, "original_rows": original_rows,
                               "index": open_generated(store)}, cfg, f"ingest-{rows}-{budget}")


# ---------------------------------------------------------------------------------------------------------------
# Report.

def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_step(args: argparse.Namespace, pure_s: float, under: dict) -> None:
    print(f"1. TRADES step: WRN-16-2 SiLU, batch {args.batch}, PGD-{args.steps}, {args.threads} threads, "
          f"{args.iters} iterations")
    print(f"   {'pure step (driver)':34s} {args.batch / pure_s:8.1f} img/s  {pure_s:7.3f} s/step")
    print(f"   {'under TorchTrainer (1 worker)':34s} {args.batch / under['step_s']:8.1f} img/s  "
          f"{under['step_s']:7.3f} s/step   x{under['step_s'] / pure_s:.3f} of pure (target <= 1.05)")
    print(f"   {'one ray.train.report (per epoch)':34s} {under['report_s']:8.3f} s")


def print_ingest(runs: dict[int, dict], step_rate: float) -> None:
    n_orig, n_gen = split_batch(INGEST_BATCH, INGEST_RATIO)
    print(f"2. Ingest, no model: batch {INGEST_BATCH} = {n_orig} original + {n_gen} generated, one pass, "
          f"decode + to_input")
    print(f"   {'generated rows':>14s}  {'whole pass':>16s}  {'after 1st batch':>16s}  {'1st batch':>9s}  "
          f"headroom = ingest / step under Train: whole pass, after 1st batch")
    for rows, r in runs.items():
        print(f"   {rows:>14,}  {r['rate']:10.1f} img/s  {r['steady_rate']:10.1f} img/s  {r['first_s']:7.2f} s  "
              f"x{r['rate'] / step_rate:.1f}, x{r['steady_rate'] / step_rate:.1f}")
    print("   (the 1st batch waits for Ray Data to start reading: paid once per pass over the generated rows)")


MEMORY_COLUMNS = {"rss_before": "RSS before", "rss_growth": "RSS growth", "private_growth": "private growth",
                  "late_growth": "private, 2nd half", "maxrss": "peak RSS"}


def print_memory(runs: dict[int, dict], budget_mb: int, no_budget: dict) -> None:
    print("3. Train worker memory over the ingest pass (growth = max sampled after each batch - before the pass), "
          f"resources.ingest_object_store_mb={budget_mb}")
    print(f"   {'rows':>9s}" + "".join(f"  {name:>14s}" for name in MEMORY_COLUMNS.values()))
    for rows, r in runs.items():
        print(f"   {rows:>9,}" + "".join(f"  {mib(r[key]):>14s}" for key in MEMORY_COLUMNS))
    small, large = runs.values()
    print(f"   {'10×N / N':>9s}" + "".join(f"  {'x%.2f' % (large[k] / max(small[k], 2**20)):>14s}"
                                          for k in MEMORY_COLUMNS) + "   (target ≈ 1: flat in the generated rows)")
    print(f"   {max(runs):>9,}" + "".join(f"  {mib(no_budget[key]):>14s}" for key in MEMORY_COLUMNS)
          + f"   no budget (=0): {no_budget['rate']:.0f} img/s vs {large['rate']:.0f} with it")
    print("   note: Ray Data holds blocks in its object store (shared memory, outside this process); the pages the "
          "worker reads zero-copy count in its RSS as shared, not in 'private' (RSS - shared); ratios floor at 1 MiB")
    if min(runs) < WINDOW_ROWS:
        print(f"   note: N is below the stream's {WINDOW_ROWS}-row window, so the N pass is one window: judge "
              "flatness by the 2nd-half column here")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=5_000, help="N: the small store's generated rows (large: 10×N)")
    ap.add_argument("--quick", action="store_true", help=f"smoke check: {QUICK}")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    n_gen = split_batch(INGEST_BATCH, INGEST_RATIO)[1]
    if args.rows < 2 * n_gen:
        ap.error(f"--rows: {args.rows} gives fewer than 2 ingest batches of {n_gen} generated rows; use >= {2 * n_gen}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    original_rows = args.rows if args.quick else ORIGINAL_ROWS
    with tempfile.TemporaryDirectory(prefix="bench_train_ray-") as tmp:
        cfg = bench_config(args, tmp)
        init_ray()
        # the pure step before and after the Train run, averaged: slow drift of the machine lands on both sides
        before = time_steps(make_context(cfg, CPU), args.iters)
        under = fit(step_worker, {"iters": args.iters, "threads": args.threads}, cfg, "step")
        pure_s = (before + time_steps(make_context(cfg, CPU), args.iters)) / 2
        # the same shard size for N and 10×N: Ray Data's blocks (hence its buffers) scale with the shard, not the store
        shard_rows = min(SHARD_ROWS, args.rows)
        stores = {rows: write_store(Path(tmp) / f"gen-{rows}", rows, shard_rows)
                  for rows in (args.rows, 10 * args.rows)}
        runs = {rows: ingest(cfg, store, rows, args.threads, original_rows) for rows, store in stores.items()}
        unbudgeted = override(cfg, {"resources.ingest_object_store_mb": 0})
        large = 10 * args.rows
        no_budget = ingest(unbudgeted, stores[large], large, args.threads, original_rows)
    print_step(args, pure_s, under)
    print_ingest(runs, args.batch / under["step_s"])
    print_memory(runs, cfg.resources.ingest_object_store_mb, no_budget)


if __name__ == "__main__":
    main()
