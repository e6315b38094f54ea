"""TRADES training-step throughput, raylab vs the reference's step, side by side in one run (ratios, not seconds).

Setting of the issue: WRN-16-2 SiLU, batch 128, PGD-10 (eps 8/255, step 2/255), 2 CPU threads. The "reference"
step reproduces what DM-Improves-AT's `trades_loss` + `WATrainer` do per step (training_recipe.md §1): a separate
frozen-BN clean forward for the KL target, the attack, clean and adversarial forwards, backward, SGD, then an EMA
update looping over parameters in Python, in the default (NCHW-contiguous) memory format. raylab's step reuses the
clean logits as the KL target (identical numbers in train-mode BN), updates the EMA with fused foreach ops, and can
run channels_last. Both use raylab's WRN, the reference's with its explicit pads and inplace SiLUs.

    python bench/bench_train_step.py [--batch 128] [--steps 10] [--iters 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import numpy as np
import torch

from raylab.attacks import frozen_bn, pgd
from raylab.config import override
from raylab.presets import make_config
from raylab.models import create_model
from raylab.train.ema import WeightAverage
from raylab.train.loop import TrainContext, train_step
from raylab.train.losses import kl_to, smooth_ce
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler


def reference_step(model, wa_model, opt, x, y, cfg, gen):
    """One step the way the reference does it (its structure, re-expressed with raylab's primitives)."""
    model.train()
    with frozen_bn(model), torch.no_grad():
        p_natural = model(x)  # the reference's extra forward for the KL target
    with frozen_bn(model):
        x_adv = pgd(model, x, y, norm="linf", eps=cfg.attack.eps, step=cfg.attack.step, steps=cfg.attack.steps,
                    objective="kl", generator=gen, ref_logits=p_natural)
    logits = model(x)
    loss = smooth_ce(logits, y, cfg.train.label_smoothing) + cfg.train.beta * kl_to(model(x_adv), logits)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():  # ema_update: one tensor at a time
        for p_wa, p in zip(wa_model.parameters(), model.parameters()):
            p_wa.mul_(0.995).add_(p, alpha=0.005)


def time_interleaved(steps: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Seconds per step of each variant, round-robin (one step of each in turn), so the VM's noise spreads evenly
    over the variants instead of landing on whichever ran during a slow minute."""
    for fn in steps.values():
        fn()  # warm-up (and, compiled, the first compilation)
        fn()  # torch.compile compiles a second graph on the step after (BN modes switch inside the step)
    total = dict.fromkeys(steps, 0.0)
    for _ in range(iters):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            total[name] += time.perf_counter() - start
    return {name: sec / iters for name, sec in total.items()}


def pad_like_reference(model):
    """The reference's WRN pads every conv_0 input with an explicit F.pad copy and runs its SiLUs inplace (which
    under autograd clones each input); raylab lets the stride-1 convs pad themselves and runs SiLU out of place
    (same numbers). Put the reference's choices back for the reference step."""
    for m in model.modules():
        if getattr(m, "_pad", "absent") is None:
            m.conv_0.padding, m._pad = (0, 0), (1, 1, 1, 1)
        if isinstance(m, torch.nn.SiLU):
            m.inplace = True
    return model


def build(cfg, channels_last: bool, reference: bool = False):
    torch.manual_seed(0)
    model = create_model("wrn-16-2", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    if reference:
        model = pad_like_reference(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train, cfg.train.batch_size)
    return model, opt


# fp32 rows give the reference's numbers to float noise; the bf16 row does not (bf16 autocast: ~3 significant
# digits), but on a CPU with AMX-BF16 (Sapphire Rapids and later) it is the big lever.
VARIANTS = {
    "raylab step": {},
    "raylab step channels_last": {"train.channels_last": True},
    "raylab step bf16+channels_last": {"train.channels_last": True, "train.bf16": True},
}
COMPILED = {"train.channels_last": True, "compile": True}  # bench only: fp32, fused BN/SiLU/add kernels


def raylab_step(cfg, switches: dict, images: np.ndarray, labels: np.ndarray) -> Callable[[], object]:
    c = override(cfg, {k: v for k, v in switches.items() if k != "compile"})
    model, opt = build(c, c.train.channels_last)
    stepped = torch.compile(model) if switches.get("compile") else model
    ctx = TrainContext(stepped, opt, build_scheduler(opt, c.train, 100), WeightAverage(model, 0.995), c.train,
                       c.attack, 10, torch.device("cpu"), torch.Generator().manual_seed(0))
    return lambda: train_step(ctx, images, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="add fp32 channels_last under torch.compile (inductor; ~90 s of compiling on 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config("paper", {"model.name": "wrn-16-2", "train.batch_size": args.batch, "attack.steps": args.steps,
                                "train.augment": "none"})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(labels)

    model, opt = build(cfg, False, reference=True)
    wa = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    steps = {"reference step": lambda: reference_step(model, wa, opt, x, y, cfg, gen)}
    variants = {**VARIANTS, **({"raylab step channels_last compiled": COMPILED} if args.compile else {})}
    for name, switches in variants.items():
        steps[name] = raylab_step(cfg, switches, images, labels)
    results = time_interleaved(steps, args.iters)
    base = results["reference step"]
    print(f"WRN-16-2 SiLU, batch {args.batch}, PGD-{args.steps}, {args.threads} threads, {args.iters} iterations")
    for name, sec in results.items():
        print(f"{name:36s} {args.batch / sec:8.1f} img/s   x{base / sec:.2f} vs reference")


if __name__ == "__main__":
    main()
