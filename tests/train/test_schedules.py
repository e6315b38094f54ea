"""Schedules: onecycle equals torch's OneCycleLR (as the reference steps it), granularity, momentum, resume."""
import math

import pytest
import torch

from raylab.config import TrainConfig
from raylab.knobs import ConfigError
from raylab.train.schedules import SCHEDULES, build_scheduler, cosine_factor, onecycle_factor


def _optimizer(lr=0.2, momentum=0.9):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum, nesterov=momentum > 0)


def _run(cfg, steps_per_epoch, n_steps, momentum=0.9):
    """(lr, momentum) in effect for each of the first n_steps optimizer steps."""
    opt = _optimizer(cfg.lr, momentum)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(n_steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    return out


def _torch_onecycle(lr, total, pct):
    """(lr, momentum) per step of torch's OneCycleLR, the reference's `cosinew` (stepped once per epoch)."""
    opt = _optimizer(lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, pct_start=pct, total_steps=total)
    out = []
    for _ in range(total):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        ref.step()
    return out


@pytest.mark.parametrize("epochs", [400, 37, 10])
def test_onecycle_per_epoch_matches_torch(epochs):
    cfg = TrainConfig(epochs=epochs, lr=0.2, scheduler="onecycle", schedule_per="epoch", warmup_frac=0.025)
    spe = 3
    ours = _run(cfg, spe, epochs * spe)[::spe]  # first step of each epoch
    ref = _torch_onecycle(0.2, epochs, 0.025)
    for e, ((lr, m), (lr_ref, m_ref)) in enumerate(zip(ours, ref)):
        assert lr == pytest.approx(lr_ref, rel=1e-12, abs=1e-15), f"epoch {e}"
        assert m == pytest.approx(m_ref, rel=1e-12), f"epoch {e}"


def test_onecycle_per_step_matches_torch_over_all_steps():
    epochs, spe = 20, 7
    cfg = TrainConfig(epochs=epochs, lr=0.1, scheduler="onecycle", schedule_per="step", warmup_frac=0.1)
    ours = _run(cfg, spe, epochs * spe)
    ref = _torch_onecycle(0.1, epochs * spe, 0.1)
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in ref], rel=1e-12, abs=1e-15)
    assert [m for _, m in ours] == pytest.approx([m for _, m in ref], rel=1e-12)


def test_onecycle_landmarks_400_epochs():
    lr, total, pct = 0.2, 400, 0.025
    assert onecycle_factor(0, total, pct) * lr == pytest.approx(lr / 25)
    peak = math.ceil(pct * total) - 1
    assert peak == 9
    assert onecycle_factor(peak, total, pct) == pytest.approx(1.0)
    assert onecycle_factor(peak - 1, total, pct) < 1.0 and onecycle_factor(peak + 1, total, pct) < 1.0
    assert onecycle_factor(total - 1, total, pct) * lr == pytest.approx(lr / 25 / 1e4)  # 8e-7
    assert onecycle_factor(total + 5, total, pct) == onecycle_factor(total - 1, total, pct)  # held after the end


def test_momentum_cycles_and_is_off_without_momentum():
    cfg = TrainConfig(epochs=400, scheduler="onecycle")
    moms = [m for _, m in _run(cfg, 1, 400)]
    assert moms[0] == pytest.approx(0.95) and moms[9] == pytest.approx(0.85) and moms[-1] == pytest.approx(0.95)
    assert all(m == 0.0 for _, m in _run(cfg, 1, 20, momentum=0.0))
    assert all(m == 0.9 for _, m in _run(TrainConfig(epochs=20, scheduler="cosine"), 1, 20))


def test_per_epoch_is_constant_within_epoch_and_per_step_is_not():
    spe, epochs = 5, 8
    per_epoch = [lr for lr, _ in _run(TrainConfig(epochs=epochs, scheduler="cosine", schedule_per="epoch"),
                                      spe, spe * epochs)]
    per_step = [lr for lr, _ in _run(TrainConfig(epochs=epochs, scheduler="cosine", schedule_per="step"),
                                     spe, spe * epochs)]
    for e in range(epochs):
        assert len(set(per_epoch[e * spe:(e + 1) * spe])) == 1
    assert len(set(per_step)) == spe * epochs  # strictly moving every step
    assert per_step[0] == per_epoch[0]


def test_cosine_without_warmup_matches_torch_and_warmup_ramps():
    epochs, lr = 12, 0.1
    cfg = TrainConfig(epochs=epochs, lr=lr, scheduler="cosine", warmup_frac=0.0)
    opt = _optimizer(lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    ours = _run(cfg, 1, epochs)
    for lr_ours, _ in ours:
        assert lr_ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        ref.step()
    assert [cosine_factor(t, 100, 0.05) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert 0.99 < cosine_factor(5, 100, 0.05) < 1.0  # decay starts right after the peak tick
    assert cosine_factor(99, 100, 0.05) > 0 and cosine_factor(100, 100, 0.05) == pytest.approx(0.0, abs=1e-15)


def test_constant():
    assert {lr for lr, _ in _run(TrainConfig(epochs=3, lr=0.3, scheduler="constant"), 2, 6)} == {0.3}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("per", ["epoch", "step"])
def test_resume_continues_identically(name, per):
    cfg = TrainConfig(epochs=6, scheduler=name, schedule_per=per, warmup_frac=0.2)
    full = _run(cfg, 4, 24)
    opt = _optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg, 4)
    for _ in range(10):
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = _optimizer(cfg.lr)
    opt2.load_state_dict(opt_state)
    sched2 = build_scheduler(opt2, cfg, 4)
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(14):
        resumed.append((opt2.param_groups[0]["lr"], opt2.param_groups[0]["momentum"]))
        sched2.step()
    assert resumed == full[10:]


def test_peak_lr_is_the_optimizers_lr():
    opt = _optimizer(0.8)  # e.g. after linear scaling in build_optimizer
    build_scheduler(opt, TrainConfig(epochs=10, lr=0.2, scheduler="constant"), 1)
    assert opt.param_groups[0]["lr"] == 0.8


def test_bad_inputs():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(_optimizer(), TrainConfig(), 0)
    sched = build_scheduler(_optimizer(), TrainConfig(epochs=5), 2)
    with pytest.raises(ValueError, match="schedule state"):
        sched.load_state_dict({"num_steps": 3, "total_ticks": 6, "steps_per_tick": 2})
    with pytest.raises(ConfigError):
        TrainConfig(scheduler="step")
