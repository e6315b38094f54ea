"""Generation throughput: the Ray Data job with 1 vs 2 sampler actors, against the sampler in a plain loop.

    python bench/bench_generate.py [--per-class 40] [--shard-size 50] [--steps 2] [--batch-size 25] [--scorer none]

A random tiny EDM (the `tiny` preset's network; weights do not change the cost) samples the same set three ways:

* loop:     `SamplerActor.sample_shard` over every shard in this process, 1 torch thread (what one actor with
            num_cpus=1 gets), no Ray: the cost of the math alone;
* 1 actor:  `run_generate` with resources.sampler_actors=1 (Ray Data: sampler actor → writer tasks);
* 2 actors: the same with 2 sampler actors.

Reported: images/s of each, the 2-vs-1 actor ratio, the pipeline overhead of 1 actor over the loop (actor
start-up, Ray Data scheduling, Parquet writing) and how much of it lies outside the sampler calls, and the samplers'
utilization = their summed busy time / (wall time × actors). Each pipeline run starts fresh actor processes, so the
fixed start-up (import torch, load the network) is included; it shrinks relative to the work as the set grows. The
three stores are compared byte for byte (they must be identical: images are seeded per image). The sampler is the
tiny preset's (Heun, `--steps` steps).

Measured on a quiet 2-core box (load average 2), no scorer, in one session:

    python bench/bench_generate.py --per-class 200 --shard-size 100      # 2000 images, 20 shards

           run   seconds  images/s  sampler busy s  utilization
          loop      42.4     47.13
       1 actor      54.7     36.57            46.1          84%
      2 actors      29.2     68.47            43.8          75%
    2 actors / 1 actor throughput: 1.87x
    pipeline overhead (1 actor vs loop): +29% (12.3 s), 8.6 s of it outside the sampler calls

    python bench/bench_generate.py                                       # the defaults: 400 images, 8 shards

    2 actors / 1 actor throughput: 1.58x; pipeline overhead +109% (10.5 s), 8.3 s outside the sampler calls

The fixed ~8.5 s (actor start-up, first Ray Data job) is what the small set cannot amortize. All stores were
byte-identical in every run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raylab.config import EDMConfig, ExperimentConfig  # noqa: E402
from raylab.presets import make_config  # noqa: E402
from raylab.data.shards import ShardStore  # noqa: E402
from raylab.generate.checkpoint import save_edm  # noqa: E402
from raylab.generate.networks import build_edm  # noqa: E402
from raylab.io import sha256_file  # noqa: E402
from raylab.pipeline.actors import SamplerActor, ScorerActor, shard_columns  # noqa: E402
from raylab.pipeline.generate_job import plan_job, run_generate  # noqa: E402


def bench_config(args: argparse.Namespace, root: Path, actors: int) -> ExperimentConfig:
    """The tiny preset with a random network of the tiny preset's EDM architecture (saved once under root)."""
    tiny, ckpt = make_config("tiny"), root / "edm"
    if not ckpt.exists():
        arch = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "augment_dim", "dropout")
        save_edm(ckpt, build_edm(EDMConfig(**{k: getattr(tiny.edm, k) for k in arch})).eval())
    return make_config("tiny", {
        "generate.checkpoint": str(ckpt), "generate.per_class": args.per_class, "generate.shard_size": args.shard_size,
        "generate.steps": args.steps, "generate.batch_size": args.batch_size, "resources.sampler_actors": actors,
        "select.scorer_checkpoint": args.scorer, "tracking.root": str(root / "runs")})


def plain_loop(cfg: ExperimentConfig, out: Path) -> float:
    """Every shard sampled (and scored, when the set has a scorer) by in-process actors with 1 thread, written
    through ShardStore: the pipeline's work without Ray."""
    spec = plan_job(cfg, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        sampler, scorer = SamplerActor(spec), ScorerActor(spec) if spec.scorer else None
        for first, last in spec.plan.shards():
            row = sampler.sample_shard(first, last)
            _, _, cols = shard_columns(scorer(row) if scorer else row, spec.plan)
            ShardStore(out).write_shard(first, last, cols)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def hashes(store: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(store.glob("gen-*.parquet"))}


def report_differences(root: Path, runs: list[str]) -> None:
    """Stores must be byte-identical; print what differs (shard, images, pixels) when they are not."""
    from raylab.data.shards import read_numpy

    ref = hashes(root / runs[0])
    for other in runs[1:]:
        bad = [n for n, h in hashes(root / other).items() if ref.get(n) != h]
        if not bad:
            print(f"{other}: byte-identical to {runs[0]}")
            continue
        a, b = (read_numpy(root / r, ["image", "seed"])["image"] for r in (runs[0], other))
        rows = np.flatnonzero((a != b).reshape(len(a), -1).any(1))
        print(f"{other}: {len(bad)} shards differ from {runs[0]}: {len(rows)} images, "
              f"{int((a != b).sum())} pixel values, max |diff| {int(np.abs(a.astype(int) - b).max())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--scorer", default="none",
                        help="select.scorer_checkpoint: none (sampling only), '' (committed digits scorer) or a path")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        root = Path(tmp)
        cfg1 = bench_config(args, root, 1)
        n = cfg1.generate.per_class * 10
        loop_s = plain_loop(cfg1, root / "loop")
        times, busy = {}, {}
        for actors in (1, 2):
            out = run_generate(bench_config(args, root, actors), root / f"actors{actors}", track=False)
            times[actors], busy[actors] = out.seconds, out.sample_seconds
        report_differences(root, ["actors1", "actors2", "loop"])
        load = os.getloadavg()[0]
        print(f"\n{n} images, {args.steps} steps, shard {args.shard_size}, batch {args.batch_size}, "
              f"{os.cpu_count()} cores, load average {load:.1f}")
        print(f"{'run':>10} {'seconds':>9} {'images/s':>9} {'sampler busy s':>15} {'utilization':>12}")
        print(f"{'loop':>10} {loop_s:9.1f} {n / loop_s:9.2f}")
        for a in (1, 2):
            print(f"{f'{a} actor' + 's' * (a > 1):>10} {times[a]:9.1f} {n / times[a]:9.2f} {busy[a]:15.1f} "
                  f"{busy[a] / (times[a] * a):12.0%}")
        print(f"2 actors / 1 actor throughput: {times[1] / times[2]:.2f}x")
        print(f"pipeline overhead (1 actor vs loop): {times[1] / loop_s - 1:+.0%} ({times[1] - loop_s:.1f} s)")
        print(f"  of which outside the sampler calls (actor start-up, scheduling, writing): "
              f"{times[1] - busy[1]:.1f} s; the 1-actor sampler's busy time is {busy[1] / loop_s:.2f}x the loop's "
              "whole time")


if __name__ == "__main__":
    main()
