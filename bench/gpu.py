"""One-GPU throughput of raylab's heavy paths in img/s and as a share of the card's dense peak.

Sections, each in fp32 (TF32 off), TF32 and bf16 autocast (TF32 on for what autocast leaves in fp32):
  1. EDM sampling, CIFAR-10 DDPM++ (edm-cifar10-32x32-cond-vp's configuration, random weights), 20 Heun steps;
  2. a TRADES-10 training step of WRN-28-10 (raylab.train.loop.train_step: host batch in, EMA update out), eager
     and torch.compile'd, plus bf16 under train.deterministic (its cost);
  3. APGD-CE (100 iterations, 1 restart) on WRN-28-10, labels = the model's own predictions so every image is
     attacked; bf16 through raylab.precision.BF16Logits (what eval.bf16 does);
  4. `experiments/ablate_steps.py --smoke` end to end through Ray on the device (generation, scoring, training,
     evaluation, MLflow).
FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode on the eager code (matmuls and
convolutions, forward and backward, 2 per multiply-add); % of peak = achieved FLOP/s over the dense peak of the
row's arithmetic on an H100 SXM (NVIDIA's datasheet: bf16 989, TF32 495, fp32 67 TFLOPS); other cards have other
peaks (--peaks). Timings: median of a few calls (`Size`) after warm-up calls (cuDNN autotuning, compilation), each
call ended by a device synchronize. Rows that would start past --budget-s are skipped, and say so.

    python bench/gpu.py                         # CUDA; sized for <= 8 min on one H100 (estimated from FLOPs:
                                                # not yet run on a GPU; --budget-s drops the compiled rows first)
    python bench/gpu.py --device cpu --quick    # everything tiny on CPU, a CI-sized check (tests/test_bench_gpu.py)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# cuBLAS reads its workspace setting before its first call: the deterministic row needs it (raylab.runtime).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from raylab.config import EDMConfig  # noqa: E402
from raylab.generate.networks import build_edm  # noqa: E402
from raylab.generate.sampler import edm_sample, expected_nfe  # noqa: E402
from raylab.models import create_model  # noqa: E402
from raylab.precision import BF16Logits, autocast  # noqa: E402
from raylab.presets import make_config  # noqa: E402
from raylab.runtime import gpu_backends  # noqa: E402
from raylab.train.ema import WeightAverage  # noqa: E402
from raylab.train.loop import TrainContext, train_step  # noqa: E402
from raylab.train.optim import build_optimizer  # noqa: E402
from raylab.train.schedules import build_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100_SXM_DENSE_TFLOPS = {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Size:
    """What one run measures: full (one H100) or quick (CPU, seconds)."""
    edm_images: int = 128
    edm_steps: int = 20     # Wang et al. 2023's 20 Heun steps
    sample_iters: int = 2
    model: str = "wrn-28-10"
    batch: int = 128        # the paper's global 512 over 4 GPUs (Wang et al. 2023)
    attack_steps: int = 10
    step_iters: int = 5
    apgd_images: int = 128
    apgd_iters: int = 100   # AutoAttack's APGD budget


QUICK = Size(edm_images=2, edm_steps=2, sample_iters=1, model="wrn-10-1", batch=8, attack_steps=2, step_iters=1,
             apgd_images=8, apgd_iters=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _NoModuleTracking(contextlib.nullcontext):
    parents = {"Global"}


def count_flops(fn: Callable[[], object]) -> int:
    """FlopCounterMode's total for `fn`. Its per-module breakdown hooks every module's inputs, which breaks
    torch.autograd.grad on a leaf input (the attack's x_adv): the totals need no modules, so it is switched off."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def precision(name: str, device: torch.device, deterministic: bool = False):
    """fp32: TF32 off; tf32: TF32 on; bf16: autocast, TF32 on for the rest (raylab's train.tf32 default)."""
    with gpu_backends(tf32=name != "fp32", deterministic=deterministic), autocast(device.type, name == "bf16"):
        yield


class Report:
    def __init__(self, device: torch.device, peaks: dict[str, float], budget_s: float):
        self.device, self.peaks, self.deadline = device, peaks, time.perf_counter() + budget_s

    def header(self, title: str) -> bool:
        """Print the section title; False (and say so) when the time budget is spent."""
        print(f"\n== {title}", flush=True)
        return not self.skipped("")

    def skipped(self, label: str) -> bool:
        late = time.perf_counter() > self.deadline
        if late:
            print(f"{label:34s} skipped: past --budget-s", flush=True)
        return late

    def row(self, name: str, arithmetic: str, seconds: float, images: int, flops_per_image: float) -> None:
        rate = images / seconds
        tflops = rate * flops_per_image / 1e12
        share = (f"{100 * tflops / self.peaks[arithmetic]:5.1f}% of {arithmetic} peak"
                 if self.device.type == "cuda" else "  (no peak on CPU)")
        print(f"{name:34s} {rate:10.1f} img/s  {flops_per_image / 1e9:8.2f} GFLOP/img  {tflops:8.2f} TFLOP/s  "
              f"{share}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 1. EDM sampling.

def bench_sampling(rep: Report, size: Size, quick: bool) -> None:
    cfg = make_config("tiny").edm if quick else EDMConfig()
    if not rep.header(f"EDM sampling: {'tiny' if quick else 'CIFAR-10 DDPM++'} EDM, {size.edm_steps} Heun steps "
                      f"({expected_nfe(size.edm_steps)} NFE), {size.edm_images} images"):
        return
    dev = rep.device
    net = build_edm(cfg).eval().requires_grad_(False).to(dev)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(size.edm_images, 3, 32, 32, generator=gen).to(dev)
    labels = torch.eye(10, device=dev)[torch.arange(size.edm_images, device=dev) % 10]
    with torch.no_grad():
        per_eval = count_flops(lambda: net(z[:1], torch.tensor(1.0, device=dev), labels[:1]))
        for name in PRECISIONS:
            with precision(name, dev):
                sec = timed(lambda: edm_sample(net, z, labels, num_steps=size.edm_steps), dev, size.sample_iters)
            rep.row(f"sample {name}", name, sec, size.edm_images, per_eval * expected_nfe(size.edm_steps))


# ---------------------------------------------------------------------------------------------------------------
# 2. The TRADES-10 training step.

def train_context(size: Size, name: str, device: torch.device, compiled: bool, quick: bool):
    cfg = make_config("paper", {"model.name": size.model, "train.batch_size": size.batch,
                                "attack.steps": size.attack_steps, "train.bf16": name == "bf16"})
    torch.manual_seed(0)
    model = create_model(size.model, num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    model = model.to(device, memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train, size.batch)
    # Compiled: the step runs the compiled module, the EMA averages the eager one (they share the weights).
    # --quick compiles with the eager backend: dynamo's tracing and guards without inductor's codegen.
    stepped = torch.compile(model, backend="eager" if quick else "inductor") if compiled else model
    return TrainContext(stepped, opt, build_scheduler(opt, cfg.train, 1000), WeightAverage(model, 0.995),
                        cfg.train, cfg.attack, 10, device, torch.Generator(device=device).manual_seed(0))


def step_flops(rep: Report, size: Size, quick: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """A random host batch and the FLOPs per image of one eager step."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (size.batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size.batch)
    ctx = train_context(size, "fp32", rep.device, False, quick)
    return images, labels, count_flops(lambda: train_step(ctx, images, labels)) / size.batch


def bench_train_step(rep: Report, size: Size, quick: bool) -> None:
    """Eager steps in each precision, and bf16 under train.deterministic (an op without a deterministic CUDA
    kernel shows up here as a failed row)."""
    if not rep.header(f"TRADES-{size.attack_steps} step: {size.model}, batch {size.batch}, channels_last, eager"):
        return
    dev = rep.device
    images, labels, per_image = step_flops(rep, size, quick)
    for name, deterministic in [(name, False) for name in PRECISIONS] + [("bf16", True)]:
        label = f"step {name}{' deterministic' if deterministic else ''}"
        try:
            with precision(name, dev, deterministic):
                ctx = train_context(size, name, dev, False, quick)
                rep.row(label, name, timed(lambda: train_step(ctx, images, labels), dev, size.step_iters),
                        size.batch, per_image)
        except RuntimeError as err:
            print(f"{label:34s} failed: {str(err).splitlines()[0]}", flush=True)


def bench_compiled_step(rep: Report, size: Size, quick: bool) -> None:
    """The same step through one torch.compile'd module for all three precisions: fp32 and TF32 share the graphs
    (cuDNN and cuBLAS read the TF32 flags at run time), bf16 autocast compiles its own."""
    backend = "eager" if quick else "inductor"
    if not rep.header(f"TRADES-{size.attack_steps} step, torch.compile (backend {backend}"
                      f"{': tracing and guards, no codegen' if quick else ''})"):
        return
    dev = rep.device
    images, labels, per_image = step_flops(rep, size, quick)
    ctx = train_context(size, "fp32", dev, True, quick)
    for name in PRECISIONS:
        label = f"step {name} compiled"
        if rep.skipped(label):
            return
        ctx.train = dataclasses.replace(ctx.train, bf16=name == "bf16")
        with precision(name, dev):
            # Two warm-up steps: the first compiles the train-mode graphs, the attack's frozen-BN graphs follow.
            sec = timed(lambda: train_step(ctx, images, labels), dev, size.step_iters, warmup=2)
        rep.row(label, name, sec, size.batch, per_image)


# ---------------------------------------------------------------------------------------------------------------
# 3. APGD-CE.

def bench_apgd(rep: Report, size: Size) -> None:
    from pyautoattack.autopgd_base import APGDAttack

    if not rep.header(f"APGD-CE: {size.model}, {size.apgd_iters} iterations, 1 restart, {size.apgd_images} images"):
        return
    dev = rep.device
    torch.manual_seed(0)
    model = create_model(size.model, num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    model = model.to(dev, memory_format=torch.channels_last).eval()
    x = torch.rand(size.apgd_images, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correct, so every image is attacked

    def fwd_bwd():
        xi = x[:1].clone().requires_grad_(True)
        torch.autograd.grad(model(xi).sum(), xi)

    per_image = count_flops(fwd_bwd) * (size.apgd_iters + 1)  # the start point plus one pass per iteration
    for name in PRECISIONS:
        attacked = BF16Logits(model).eval() if name == "bf16" else model
        runs = [APGDAttack(attacked, n_iter=n, norm="Linf", n_restarts=1, eps=8 / 255, seed=0, loss="ce",
                           device=dev) for n in (2, size.apgd_iters)]  # a 2-iteration warm-up, then the timed one
        with gpu_backends(tf32=name != "fp32"):
            timed(lambda: runs[0].perturb(x, y), dev, 1, warmup=0)
            sec = timed(lambda: runs[1].perturb(x, y), dev, 1, warmup=0)
        rep.row(f"apgd-ce {name}", name, sec, size.apgd_images, per_image)


# ---------------------------------------------------------------------------------------------------------------
# 4. The main job's smoke mode, end to end.

GPU_SMOKE = ["--set", "resources.use_gpu=true", "--set", "resources.gpus_per_actor=0.25",
             "--set", "resources.scorer_gpus_per_actor=0.25", "--set", "train.bf16=true"]


def bench_smoke(rep: Report, quick: bool, timeout_s: float) -> None:
    if not rep.header("experiments/ablate_steps.py --smoke through Ray"):
        return
    if rep.device.type == "cpu" and quick:
        print("skipped under --device cpu --quick: the smoke sweep takes minutes on CPU (CI runs it in "
              "tests/test_experiments.py); run without --quick to time it", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="raylab-bench-gpu-") as root:
        cmd = [sys.executable, str(ROOT / "experiments" / "ablate_steps.py"), "--smoke", "--set",
               f"tracking.root={root}", *(GPU_SMOKE if rep.device.type == "cuda" else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"timed out after {timeout_s:.0f} s", flush=True)
            return
        wall = time.perf_counter() - start
        print(f"exit {done.returncode} in {wall:.1f} s wall ({' '.join(cmd[1:])})", flush=True)
        if done.returncode:
            print((done.stdout + done.stderr)[-3000:], flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU seconds); compiled rows use the eager "
                    "backend and, on CPU, the end-to-end smoke is skipped")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the rows that would start later (a row "
                    "running at the deadline finishes: a compiled one can take two minutes)")
    ap.add_argument("--smoke-timeout-s", type=float, default=240.0)
    ap.add_argument("--peaks", default=",".join(f"{k}={v:g}" for k, v in H100_SXM_DENSE_TFLOPS.items()),
                    help="dense TFLOPS per arithmetic (default: H100 SXM)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible (use --device cpu --quick for the CPU check)")
        return 2
    peaks = {k: float(v) for k, v in (item.split("=") for item in args.peaks.split(","))}
    size = QUICK if args.quick else Size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, peaks (dense TFLOPS) {peaks}, "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)
    rep = Report(device, peaks, args.budget_s)
    bench_sampling(rep, size, args.quick)
    bench_train_step(rep, size, args.quick)
    bench_apgd(rep, size)
    bench_smoke(rep, args.quick, args.smoke_timeout_s)
    bench_compiled_step(rep, size, args.quick)  # last: compiling takes minutes and is the first thing to drop
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
