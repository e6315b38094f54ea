"""Sharded AutoAttack throughput: images/s of `raylab.eval.job.evaluate` with 1 vs 2 Ray Data actors.

The workload is the expensive part of an evaluation, AutoAttack (custom version, APGD-CE: 5 restarts x 100 steps
on every point still robust), on a WRN (random init) with labels = its own predictions, so every image is attacked;
PGD is 1 step and certification off. Each actor count starts from an empty result directory and runs the whole
Ray Data pipeline (actor start-up included, as a user sees it). The table gives wall time, images/s, the speed-up
over 1 actor, and the chunk compute time summed over chunks (actor wall and CPU), from which the pipeline's
overhead and the CPU share an actor actually got follow. "steady" is the speed-up of the chunk throughput alone
(images / (chunk wall / actors)): what the sharding gives once the actors are up, i.e. on a real test set, where
the ~10 s of actor start-up and the last chunk's tail vanish. It also checks that all runs give identical flags.

    python bench/bench_eval.py                        # 64 images in chunks of 4, 1 and 2 actors (CPU, ~10 min)
    python bench/bench_eval.py --images 8 --chunk 2   # a quick look (start-up dominates)
    python bench/bench_eval.py --images 64 --chunk 8 --actors 1,2,4 --gpus-per-actor 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per actor: 2 actors on 2 cores, no oversubscription

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raylab.config import EvalConfig, ResourcesConfig  # noqa: E402
from raylab.data.datasets import get_dataset  # noqa: E402
from raylab.eval.chunk import to_float  # noqa: E402
from raylab.eval.job import CheckpointSource, chunk_path, evaluate  # noqa: E402
from raylab.models import create_model  # noqa: E402


def workload(args: argparse.Namespace, root: Path) -> tuple[CheckpointSource, np.ndarray, np.ndarray]:
    """A saved random-init model and digits images labelled by it (clean accuracy 100 %)."""
    spec = get_dataset("digits")
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, mean=spec.mean, std=spec.std).eval()
    torch.save({"model": model.state_dict()}, root / "model.pt")
    images = spec.load(Path("data"), False)[1].images[:args.images]
    with torch.no_grad():
        labels = model(to_float(images)).argmax(1).numpy()
    return CheckpointSource(str(root / "model.pt"), args.model, "silu", 10, spec.mean, spec.std), images, labels


def run(actors: int, args: argparse.Namespace, source, images, labels, root: Path) -> dict:
    ev = EvalConfig(chunk_size=args.chunk, batch_size=args.chunk, pgd_steps=1, eps=args.eps,
                    autoattack="custom", aa_attacks="apgd-ce", seed=0)
    res = ResourcesConfig(eval_actors=actors, cpus_per_actor=1.0, gpus_per_actor=args.gpus_per_actor)
    began = time.perf_counter()
    out = evaluate(source, images, labels, ev, root / f"actors-{actors}", resources=res, engine="ray")
    wall = time.perf_counter() - began
    records = [json.loads(chunk_path(out.out_dir, i).read_text()) for i in range(out.chunks_total)]
    return {"actors": actors, "wall": wall, "img_s": len(labels) / wall, "out": out,
            "chunk_wall": sum(r["seconds"] for r in records), "chunk_cpu": sum(r["cpu_seconds"] for r in records),
            "pids": len({r["pid"] for r in records})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn-16-2")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args()
    from raylab.cluster import init_ray

    init_ray(log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        source, images, labels = workload(args, root)
        print(f"{args.model}, {len(labels)} images in chunks of {args.chunk}, AutoAttack custom [apgd-ce] at "
              f"eps={args.eps:.4f}, cores={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        print(f"{'actors':>6} {'wall s':>8} {'img/s':>7} {'speed-up':>8} {'chunk wall s':>12} {'chunk cpu s':>11} "
              f"{'cpu/wall':>8} {'overhead s':>10} {'steady':>6} {'pids':>4} {'AA acc':>6}")
        rows = [run(int(k), args, source, images, labels, root) for k in args.actors.split(",")]
        for r in rows:
            busy = r["chunk_wall"] / r["actors"]
            steady = rows[0]["chunk_wall"] / busy  # 1 actor's busy time is its summed chunk wall
            print(f"{r['actors']:6d} {r['wall']:8.1f} {r['img_s']:7.3f} {r['img_s'] / rows[0]['img_s']:8.2f} "
                  f"{r['chunk_wall']:12.1f} {r['chunk_cpu']:11.1f} {r['chunk_cpu'] / r['chunk_wall']:8.2f} "
                  f"{r['wall'] - busy:10.1f} {steady:6.2f} {r['pids']:4d} {r['out'].aa_acc:6.3f}")
        same = all(np.array_equal(r["out"].result.aa.fell_at, rows[0]["out"].result.aa.fell_at) for r in rows)
        print(f"identical AutoAttack outcomes across actor counts: {same}")


if __name__ == "__main__":
    main()
