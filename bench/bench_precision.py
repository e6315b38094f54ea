"""bf16 vs fp32 attacks on one fp32-trained checkpoint: does bf16 autocast weaken PGD or AutoAttack?

The same EMA weights (a run directory's best.pt) are attacked in three precisions: fp32; bf16 autocast of the whole
network (what train.bf16 with attack.precision=train does to the training attack; x_adv itself stays fp32); bf16
with the input normalization and first convolution kept in fp32 (the perturbed input never rounded to bf16).
Per attack: robust accuracy with its 95% Wilson interval as the attacked model judges it, PGD's adversarial
examples judged again by the fp32 model (the attack's strength alone), discordant images against fp32 (robust in
one, not in the other: paired, so a difference shows long before the intervals separate), and PGD img/s.

    python bench/bench_precision.py RUN_DIR [--eps 16/255,8/255] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raylab.attacks import pgd
from raylab.attacks.pgd import default_step
from raylab.config import from_json
from raylab.data.datasets import get_dataset
from raylab.eval.autoattack import Budget, run_autoattack
from raylab.eval.chunk import to_float
from raylab.eval.export import load_checkpoint_model
from raylab.eval.job import load_test_subset
from raylab.eval.metrics import format_accuracy
from raylab.precision import BF16Logits


class FP32(nn.Module):
    """`module` outside autocast, on an fp32 input."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def fp32_stem(model: nn.Module) -> nn.Module:
    """A copy whose first convolution (and the normalization before it) runs in fp32 under autocast."""
    stem = copy.deepcopy(model)
    stem.init_conv = FP32(stem.init_conv)
    return stem


VARIANTS = {
    "fp32": lambda model: model,
    "bf16": lambda model: BF16Logits(model).eval(),
    "bf16, fp32 stem": lambda model: BF16Logits(fp32_stem(model)).eval(),
}


def input_spacing(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """bf16's spacing at the normalized input, back in pixel units x 255: (median, 90th percentile)."""
    z = ((x - model.mean) / model.std).abs().clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(z)) - 7) * model.std  # 8 significant bits: spacing 2^(e-7)
    return float(ulp.median() * 255), float(ulp.flatten().quantile(0.9) * 255)


def run_pgd(model: nn.Module, judge: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
            batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """PGD-k (CE, one uniform random start, step eps/4): (robust per the attacked model, robust per `judge`,
    seconds). Same CPU generator for every variant: the same random starts."""
    gen = torch.Generator().manual_seed(0)
    own, fp32, seconds = [], [], 0.0
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        start = time.perf_counter()
        x_adv = pgd(model, xb, yb, norm="linf", eps=eps, step=default_step("linf", eps, steps), steps=steps,
                    objective="ce", generator=gen)
        seconds += time.perf_counter() - start
        with torch.no_grad():
            own.append((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb))
            fp32.append((judge(xb).argmax(1) == yb) & (judge(x_adv).argmax(1) == yb))
    return torch.cat(own).numpy(), torch.cat(fp32).numpy(), seconds


def run_aa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg) -> np.ndarray:
    """APGD-CE + APGD-T at the run config's custom budget (the tiny preset: 25 iterations, 1 restart, 3 targets)."""
    ev = cfg.eval
    return run_autoattack(model, x, y, eps=eps, version="custom", attacks=("apgd-ce", "apgd-t"), seed=ev.seed,
                          batch_size=ev.batch_size, budget=Budget(ev.aa_iters, ev.aa_restarts,
                                                                   ev.aa_target_classes)).robust


def row(name: str, attack: str, flags: np.ndarray, ref: np.ndarray | None, extra: str = "") -> str:
    discordant = "-" if ref is None else f"{int((ref & ~flags).sum())}/{int((~ref & flags).sum())}"
    return f"{name:16s} {attack:24s} {format_accuracy(float(flags.mean()), len(flags)):22s} {discordant:>10s} {extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run directory (config.json, best.pt)")
    ap.add_argument("--eps", default="16/255,8/255", help="comma list of L-inf radii (the tiny preset: 16/255)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = from_json((args.run / "config.json").read_text())
    spec = get_dataset(cfg.data.dataset)
    model = load_checkpoint_model(args.run / "best.pt", cfg.model.name, num_classes=spec.num_classes,
                                  mean=spec.mean, std=spec.std, activation=cfg.model.activation)
    images, labels = load_test_subset(cfg)
    x, y = to_float(images), torch.from_numpy(labels.astype(np.int64))
    med, p90 = input_spacing(model, x)
    print(f"{cfg.model.name} {args.run.name}, {len(y)} {cfg.data.dataset} test images, {args.threads} threads; "
          f"bf16 spacing at the normalized input: median {med:.2f}/255, 90th percentile {p90:.2f}/255")
    print(f"{'precision':16s} {'attack':24s} {'robust % [95% CI]':22s} {'fp32-only/this-only':>10s}")
    for eps_text in args.eps.split(","):
        eps = float(Fraction(eps_text))
        ref = {}
        for name, make in VARIANTS.items():
            attacked = make(model)
            own, judged, sec = run_pgd(attacked, model, x, y, eps, args.steps, cfg.eval.batch_size)
            aa = run_aa(attacked, x, y, eps, cfg)
            ref = ref or {"pgd": own, "judged": judged, "aa": aa}
            tag = f"eps {eps_text}"
            print(row(name, f"PGD-{args.steps} {tag}", own, ref["pgd"] if name != "fp32" else None,
                      f"{len(y) / sec:7.1f} img/s"))
            print(row(name, "  x_adv judged in fp32", judged, ref["judged"] if name != "fp32" else None))
            print(row(name, f"APGD-CE+T {tag}", aa, ref["aa"] if name != "fp32" else None), flush=True)


if __name__ == "__main__":
    main()
