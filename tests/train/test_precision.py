"""The precision policy (raylab.precision): bf16 where train.bf16 asks, an fp32 attack perturbation, fp32 evaluation
unless eval.bf16, the GPU backend settings, and the derived `precision.*` MLflow params."""
import dataclasses

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from raylab.config import EvalConfig
from raylab.data.datasets import load_splits
from raylab.eval.job import evaluate
from raylab.models import create_model
from raylab.precision import BF16Logits, precision_params
from raylab.presets import make_config
from raylab.runs import run_dir
from raylab.runtime import gpu_backends
from raylab.train.ema import WeightAverage
from raylab.train.job import open_tracker
from raylab.train.loop import TrainContext, to_device, train_step
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler

BATCH = 16


def one_step(switches: dict) -> tuple[list[torch.dtype], dict, torch.Tensor]:
    """One TRADES-2 step of WRN-10-1: the dtype each forward's first convolution computed in, in order, the loss's
    stats and the clean input."""
    cfg = make_config("tiny", {"data.max_train": BATCH, "train.batch_size": BATCH, "attack.steps": 2,
                               "train.augment": "none", **switches})
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    model = create_model("wrn-10-1", num_classes=10, mean=splits.mean, std=splits.std)
    opt = build_optimizer(model, cfg.train, BATCH)
    ctx = TrainContext(model, opt, build_scheduler(opt, cfg.train, 1), WeightAverage(model, 0.5), cfg.train,
                       cfg.attack, 10, torch.device("cpu"), torch.Generator().manual_seed(0))
    seen, stats = [], {}
    model.init_conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss_fn = ctx.loss_fn

    def keep_stats(*args, **kwargs):
        loss, out = loss_fn(*args, **kwargs)
        stats.update(out)
        return loss, out

    ctx.loss_fn = keep_stats
    train_step(ctx, splits.train.images[:BATCH], splits.train.labels[:BATCH])
    x = torch.as_tensor(splits.train.images[:BATCH]).permute(0, 3, 1, 2).float() / 255
    return seen, stats, x


@pytest.mark.parametrize("precision, attack_dtype", [("train", torch.bfloat16), ("fp32", torch.float32)])
def test_attack_precision_picks_the_attack_passes_dtype(precision, attack_dtype):
    """TRADES runs clean forward, 2 attack forwards, adversarial forward: with train.bf16 the outer two are bf16
    and the attack's follow attack.precision."""
    seen, _, _ = one_step({"train.bf16": True, "attack.precision": precision})
    assert seen == [torch.bfloat16, attack_dtype, attack_dtype, torch.bfloat16]


def test_the_perturbation_is_fp32_arithmetic_under_bf16():
    """x_adv is an fp32 tensor, inside the eps-ball and [0, 1], and off bf16's grid: the steps, projection and clamp
    did not round to bf16 (only the copy entering the first convolution does)."""
    _, stats, x = one_step({"train.bf16": True})
    x_adv, eps = stats["x_adv"], make_config("tiny").attack.eps
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert (x_adv != x_adv.bfloat16().float()).float().mean() > 0.5


def test_bf16_logits_computes_in_bf16_and_returns_fp32():
    torch.manual_seed(0)
    model = create_model("wrn-10-1", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    seen = []
    model.init_conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out, ref = BF16Logits(model)(x), model(x)
    assert out.dtype == torch.float32 and seen == [torch.bfloat16, torch.float32]
    assert 0 < (out - ref).abs().max() < 0.1 * ref.abs().max()


class _Recorder(nn.Module):
    """A small CNN that records the dtype its convolution computed in."""

    def __init__(self, seen: list):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head, self.seen = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4 * 8 * 8, 10), seen

    def forward(self, x):
        out = self.conv(x)
        self.seen.append(out.dtype)
        return self.head(out.flatten(1))


@dataclasses.dataclass(frozen=True)
class _Source:
    seen: list

    def load(self, device):
        return _Recorder(self.seen).to(device).eval()


@pytest.mark.parametrize("bf16", [False, True])
def test_evaluation_is_fp32_unless_eval_bf16(tmp_path, bf16):
    """Clean, PGD and AutoAttack (APGD-CE) of the eval job: fp32 by default, bf16 only when eval.bf16 asks."""
    seen = []
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 8)
    ev = EvalConfig(pgd_steps=1, autoattack="custom", aa_attacks="apgd-ce", aa_iters=2, aa_restarts=1,
                    chunk_size=8, batch_size=8, bf16=bf16)
    evaluate(_Source(seen), images, labels, ev, tmp_path / "eval", engine="local")
    computed = seen[1:]  # the first is the driver's one-image preflight, in fp32 whatever the setting
    assert len(computed) > 3 and set(computed) == {torch.bfloat16 if bf16 else torch.float32}


def test_gpu_backends_sets_then_restores_the_flags():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    with gpu_backends(tf32=True):
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    with gpu_backends(tf32=False, deterministic=True):
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before


def test_to_device_leaves_the_cpu_path_alone(monkeypatch):
    """CPU batches are neither pinned nor copied (pinning is for CUDA copies only)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pytest.fail("pinned a CPU batch"))
    labels = np.arange(5)
    out = to_device(labels, torch.device("cpu"), torch.int64)
    assert out.dtype == torch.int64 and out.data_ptr() == torch.as_tensor(labels).data_ptr()


def test_to_device_pins_and_copies_asynchronously_to_cuda(monkeypatch):
    """The CUDA path (recorded on a CPU-only machine): pinned host memory, then a non-blocking copy."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k)) or self)
    to_device(np.zeros(3, np.uint8), torch.device("cuda"))
    assert calls == ["pin", ("cuda", {"non_blocking": True})]


@pytest.mark.parametrize("flat, expected", [
    ({}, ("fp32", "fp32", "fp32")),
    ({"train.bf16": True}, ("bf16", "bf16", "fp32")),
    ({"train.bf16": True, "attack.precision": "fp32"}, ("bf16", "fp32", "fp32")),
    ({"resources.use_gpu": True, "resources.gpus_per_actor": 1.0}, ("tf32", "tf32", "tf32")),
    ({"resources.use_gpu": True, "train.bf16": True, "train.tf32": False, "eval.bf16": True},
     ("bf16", "bf16", "bf16")),
    ({"resources.use_gpu": True, "train.tf32": False, "eval.tf32": False}, ("fp32", "fp32", "fp32")),
])
def test_precision_params_say_what_ran(flat, expected):
    params = precision_params(make_config("tiny", flat))
    assert (params["precision.train"], params["precision.attack"], params["precision.eval"]) == expected


def test_training_runs_record_their_precision_as_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config("tiny", {"tracking.root": str(tmp_path / "runs"), "train.bf16": True,
                               "attack.precision": "fp32"})
    with open_tracker(cfg, run_dir(cfg, "train", "precision-params"), None, None) as tracker:
        params = MlflowClient(tracker.uri).get_run(tracker.run_id).data.params
    assert {k: params[k] for k in ("precision.train", "precision.attack", "precision.eval", "train.bf16")} == {
        "precision.train": "bf16", "precision.attack": "fp32", "precision.eval": "fp32", "train.bf16": "True"}
