"""The GPU speed switches (train.bf16, train.channels_last) run on CPU too and change results only by float noise
(issue: "must not change results beyond float noise")."""
import numpy as np
import pytest
import torch

from raylab.presets import make_config
from raylab.data.datasets import load_splits
from raylab.models import create_model
from raylab.train.ema import WeightAverage
from raylab.train.loop import TrainContext, train_step
from raylab.train.optim import build_optimizer
from raylab.train.schedules import build_scheduler

BATCH = 32


def three_steps(switches: dict) -> tuple[list[float], torch.Tensor]:
    """Three TRADES steps of WRN-16-2 from one initialization; returns the losses and the final EMA logits."""
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
    losses = [train_step(ctx, splits.train.images[i:i + BATCH], splits.train.labels[i:i + BATCH])[0]
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


def test_bf16_autocast_runs_on_cpu_within_bf16_noise(plain):
    losses, logits = three_steps({"train.bf16": True, "train.channels_last": False})
    assert all(np.isfinite(losses)) and logits.dtype == torch.float32  # the weights stay float32
    # bf16 keeps ~3 significant digits: the losses agree to a few percent, not bit for bit.
    np.testing.assert_allclose(losses, plain[0], rtol=0.05)
    assert losses != plain[0]  # the switch really changed the arithmetic
    agree = (logits.argmax(1) == plain[1].argmax(1)).float().mean()
    assert agree >= 0.9
