"""Sampler throughput: raylab's `edm_sample` vs a bare Heun loop on the same network and schedule.

Both run in the same process, interleaved, `--repeats` times each. The table gives the median images/s and network
image-evaluations/s (NFE/s = images × NFE / time), and the ratio bare/raylab (1.00 = no sampler overhead) in wall
time and in process CPU time (the fair one on a shared machine). It also checks that both give the same images.
Networks: the `tiny` preset's EDM and the full CIFAR-10 DDPM++ (55.7M parameters, 42.4 GFLOP per
image-evaluation, edm.md §5).

    python bench/bench_sampler.py                       # CPU: tiny + full, 2 images, 3 steps
    python bench/bench_sampler.py --device cuda --images 256 --steps 20 --nets full
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from raylab.config import EDMConfig
from raylab.presets import make_config
from raylab.generate.networks import build_edm
from raylab.generate.sampler import edm_sample, expected_nfe, sigma_schedule

NETS: dict[str, Callable[[], EDMConfig]] = {
    "tiny": lambda: make_config("tiny").edm,
    "full": lambda: EDMConfig(),  # CIFAR-10 conditional DDPM++ (edm-cifar10-32x32-cond-vp)
}


def bare_heun(net, z: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 without churn, written as plainly as possible: the baseline."""
    x = z.double() * t[0]
    for i in range(len(t) - 1):
        d = (x - net(x, t[i], labels).double()) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if i < len(t) - 2:
            d2 = (x_next - net(x_next, t[i + 1], labels).double()) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    return x


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(wall s, process CPU s, result). CPU time is what to compare on a shared machine: wall time there
    measures the neighbours' load as much as the code."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_net(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    net = build_edm(NETS[name]()).eval().requires_grad_(False).to(device)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.images, 3, 32, 32, generator=gen).to(device)
    labels = torch.eye(10, device=device)[torch.arange(args.images, device=device) % 10]
    t = sigma_schedule(args.steps, net=net).to(device)
    runs = {"raylab": lambda: edm_sample(net, z, labels, num_steps=args.steps),
            "bare": lambda: bare_heun(net, z, labels, t)}
    with torch.no_grad():
        _timed(runs["raylab"], device)  # warm-up (allocator, cuDNN autotune, lazy init)
        walls, cpus, outs = {k: [] for k in runs}, {k: [] for k in runs}, {}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                wall, cpu, outs[key] = _timed(fn, device)
                walls[key].append(wall)
                cpus[key].append(cpu)
    wall = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    nfe = expected_nfe(args.steps)
    return dict(net=name, images=args.images, steps=args.steps, nfe=nfe, raylab_s=wall["raylab"],
                bare_s=wall["bare"], img_s=args.images / wall["raylab"], nfe_s=args.images * nfe / wall["raylab"],
                ratio=wall["bare"] / wall["raylab"], cpu_s=cpu["raylab"], cpu_ratio=cpu["bare"] / cpu["raylab"],
                max_diff=(outs["raylab"] - outs["bare"]).abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nets", default="tiny,full", help=f"comma list of {', '.join(NETS)}")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    print(f"{'net':5} {'images':>6} {'steps':>5} {'NFE':>4} {'raylab s':>9} {'bare s':>8} {'img/s':>8} "
          f"{'NFE/s':>8} {'bare/raylab':>11} {'raylab cpu s':>12} {'cpu bare/raylab':>15} {'max|diff|':>9}")
    for name in args.nets.split(","):
        r = bench_net(name.strip(), args, device)
        print(f"{r['net']:5} {r['images']:6d} {r['steps']:5d} {r['nfe']:4d} {r['raylab_s']:9.3f} {r['bare_s']:8.3f} "
              f"{r['img_s']:8.3f} {r['nfe_s']:8.2f} {r['ratio']:11.3f} {r['cpu_s']:12.3f} {r['cpu_ratio']:15.3f} "
              f"{r['max_diff']:9.2e}")


if __name__ == "__main__":
    main()
