"""The speed switches (train.bf16, train.channels_last) run on CPU too and change results only by their own rounding
(issue: "must not change results beyond float noise"); a training step leaves the host alone until the epoch ends."""
import numpy as np
import pytest
import torch

from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.data.mix import OriginalStream
from raylab.models import create_model
from raylab.train.ema import WeightAverage
from raylab.train.loop import TrainContext, mixed_batches, run_epoch, train_step
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler

BATCH = 32
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: each rounding is within 2^-8 relative


def context(switches: dict) -> tuple[TrainContext, object]:
    cfg = make_config("tiny", {"data.max_train": 3 * BATCH, "train.batch_size": BATCH, "attack.steps": 2,
                               "train.augment": "none", **switches})
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    model = create_model("wrn-16-2", num_classes=10, mean=splits.mean, std=splits.std)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train, BATCH)
    ctx = TrainContext(model, opt, build_scheduler(opt, cfg.train, 3), WeightAverage(model, 0.5), cfg.train,
                       cfg.attack, 10, torch.device("cpu"), torch.Generator().manual_seed(0))
    return ctx, splits


def three_steps(switches: dict) -> tuple[list[float], torch.Tensor]:
    """Three TRADES steps of WRN-16-2 from one initialization; returns the losses and the final EMA logits."""
    ctx, splits = context(switches)
    losses = [float(train_step(ctx, splits.train.images[i:i + BATCH], splits.train.labels[i:i + BATCH])[0])
              for i in range(0, 3 * BATCH, BATCH)]
    x = torch.as_tensor(splits.test.images[:64]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return losses, ctx.ema.module.eval()(x)


@pytest.fixture(scope="module")
def plain():
    return three_steps({"train.channels_last": False})


def test_channels_last_matches_the_default_memory_format(plain):
    losses, logits = three_steps({"train.channels_last": True})
    np.testing.assert_allclose(losses, plain[0], rtol=1e-4)
    # Only the convolutions' summation order differs; three SGD steps of WRN-10-1 grow that to ~2e-3 in the logits.
    torch.testing.assert_close(logits, plain[1], rtol=1e-2, atol=5e-3)


def test_bf16_autocast_keeps_the_losses_within_bf16_rounding(plain):
    """What bf16 promises: every rounding within u = 2^-8 relative, weights and optimizer in fp32. A batch-mean
    loss averages those errors: over three TRADES steps the losses stayed within 6e-4 relative (0.15 u) of fp32
    with oneDNN's AVX-512-BF16, AVX2 and SSE4.1 kernels alike (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), so 4 u
    leaves a 25x margin on any x86 CPU, with or without AMX. Not asserted: argmax agreement of the EMA logits.
    Three steps leave a near-uniform classifier (median top-2 margin 0.024, smaller than the 0.007-0.037 logit
    error those kernels gave), so the agreement only said which kernels the CPU has (84-100%)."""
    losses, logits = three_steps({"train.bf16": True, "train.channels_last": False})
    assert np.isfinite(losses).all() and logits.dtype == torch.float32  # the weights stay float32
    np.testing.assert_allclose(losses, plain[0], rtol=4 * BF16_UNIT_ROUNDOFF)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_switch_decides_the_convolutions_dtype(bf16):
    """The switch really reaches the network (a silent no-op would pass the tolerance test above): every
    convolution of a training step computes in bf16 with it and in fp32 without."""
    ctx, splits = context({"train.bf16": bf16, "train.channels_last": False})
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
             for m in ctx.model.modules() if isinstance(m, torch.nn.Conv2d)]
    train_step(ctx, splits.train.images[:BATCH], splits.train.labels[:BATCH])
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16 if bf16 else torch.float32}


# What reads a tensor's value into Python: on a GPU each waits for every kernel queued before it.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_a_training_epoch_reads_the_device_once(monkeypatch):
    """Loss and accuracies accumulate on the device and come back once per epoch, not three times per step
    (counted on CPU, where torch.cuda.set_sync_debug_mode does not exist: every Tensor method that hands a
    value to Python is counted)."""
    ctx, splits = context({"train.augment": "crop"})
    original = OriginalStream(len(splits.train), BATCH, seed=0)
    reads = []
    def counted(name, real):
        def read(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    stats = run_epoch(ctx, mixed_batches(original, None, splits.train.images, splits.train.labels, 3))
    monkeypatch.undo()
    assert reads == ["tolist"]  # one read for the whole epoch, at its end
    assert len(stats.losses) == 3 and stats.images == 3 * BATCH
    assert 0 <= stats.robust_correct <= stats.images and stats.loss == pytest.approx(sum(stats.losses))
