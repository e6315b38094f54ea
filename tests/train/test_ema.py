"""Weight averaging: warm-up copy, decay ramp, BN policies, BN re-estimation, exact resume, DDP unwrap."""
import pytest
import torch
from torch import nn

from raylab.config import TrainConfig
from raylab.knobs import ConfigError
from raylab.train.ema import WeightAverage, ema_decay, recompute_bn


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.5), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _train_step(net, gen):
    """A fake optimizer step: move parameters and BN stats (forward in train mode) by random amounts."""
    net.train()
    net(torch.rand(8, 3, 6, 6, generator=gen))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_module_is_a_frozen_eval_copy():
    net = _net()
    wa = WeightAverage(net, tau=0.99)
    assert not wa.module.training and all(not p.requires_grad for p in wa.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(wa.module.parameters(), net.parameters()))


def test_warmup_copies_exactly_then_decay_follows_the_ramp():
    net, gen = _net(), torch.Generator().manual_seed(1)
    wa = WeightAverage(net, tau=0.995, warmup_steps=5)
    for step in range(5):
        _train_step(net, gen)
        assert wa.update(net) == 0.0
        assert all(torch.equal(a, b) for a, b in zip(wa.module.parameters(), net.parameters()))
    before = _params(wa.module)
    _train_step(net, gen)
    decay = wa.update(net)  # step 5 = first after warm-up: delta 0 -> min(tau, 1/10)
    assert decay == pytest.approx(0.1)
    for avg, old, live in zip(wa.module.parameters(), before, net.parameters()):
        assert torch.allclose(avg, 0.1 * old + 0.9 * live, atol=1e-6)


def test_decay_formula():
    tau, warm = 0.995, 100
    assert ema_decay(99, tau, warm) == 0.0
    for delta in (0, 1, 10, 500):
        assert ema_decay(warm + delta, tau, warm) == pytest.approx(min(tau, (1 + delta) / (10 + delta)))
    assert ema_decay(warm + 1790, tau, warm) == tau  # recipe: reaches 0.995 ~1,790 steps after warm-up
    assert ema_decay(warm + 1780, tau, warm) < tau


def test_tau_zero_is_a_copy():
    net, gen = _net(), torch.Generator().manual_seed(2)
    wa = WeightAverage(net, tau=0.0, warmup_steps=0)
    for _ in range(3):
        _train_step(net, gen)
        wa.update(net)
    assert all(torch.equal(a, b) for a, b in zip(wa.module.parameters(), net.parameters()))


def test_copy_policy_copies_values_without_sharing_storage():
    net, gen = _net(), torch.Generator().manual_seed(3)
    wa = WeightAverage(net, tau=0.9, warmup_steps=0, bn="copy")
    for _ in range(3):
        _train_step(net, gen)
        wa.update(net)
    live_bn, avg_bn = net[1], wa.module[1]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(avg_bn, name), getattr(live_bn, name)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    snapshot = avg_bn.running_mean.clone()
    _train_step(net, gen)  # the live stats move; the average's must not follow until the next update
    assert torch.equal(avg_bn.running_mean, snapshot)


def test_average_policy_averages_bn_stats():
    net, gen = _net(), torch.Generator().manual_seed(4)
    wa = WeightAverage(net, tau=0.9, warmup_steps=1, bn="average")
    _train_step(net, gen)
    wa.update(net)  # warm-up: copy
    mean, var = net[1].running_mean.clone(), net[1].running_var.clone()
    _train_step(net, gen)
    decay = wa.update(net)
    assert decay == pytest.approx(0.1)
    assert torch.allclose(wa.module[1].running_mean, decay * mean + (1 - decay) * net[1].running_mean)
    assert torch.allclose(wa.module[1].running_var, decay * var + (1 - decay) * net[1].running_var)
    assert torch.equal(wa.module[1].num_batches_tracked, net[1].num_batches_tracked)


def test_recompute_bn_equals_direct_computation():
    net = _net()
    net[1].running_mean.fill_(7.0)
    net.eval()
    net[0].train()  # a mixed-mode model: each module's mode must be restored
    gen = torch.Generator().manual_seed(5)
    batches = [torch.rand(6, 3, 6, 6, generator=gen) for _ in range(3)]
    assert recompute_bn(net, iter(batches)) == 3
    with torch.no_grad():
        feats = [net[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-6)
    assert torch.allclose(net[1].running_var, var, atol=1e-6)
    assert net[1].momentum == 0.5 and not net.training and net[0].training and not net[1].training
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn(net, [])
    assert torch.allclose(net[1].running_mean, mean, atol=1e-6)  # an empty call resets nothing


def test_recompute_policy_method_uses_averaged_weights():
    net, gen = _net(), torch.Generator().manual_seed(6)
    wa = WeightAverage(net, tau=0.9, bn="recompute")
    _train_step(net, gen)
    wa.update(net)
    batches = [(torch.rand(4, 3, 6, 6, generator=gen), torch.zeros(4))]
    wa.recompute_bn(batches)
    with torch.no_grad():
        expect = wa.module[0](batches[0][0]).mean((0, 2, 3))
    assert torch.allclose(wa.module[1].running_mean, expect, atol=1e-6)
    assert not wa.module.training


def test_state_round_trip_continues_identically():
    gen_a = torch.Generator().manual_seed(7)
    net = _net()
    wa = WeightAverage(net, tau=0.99, warmup_steps=2, bn="average")
    for _ in range(4):
        _train_step(net, gen_a)
        wa.update(net)
    state = wa.state_dict()
    resumed = WeightAverage(_net(seed=9), tau=0.99, warmup_steps=2, bn="average")  # different initial weights
    resumed.load_state_dict(state)
    assert resumed.num_updates == 4
    for _ in range(3):
        _train_step(net, gen_a)
        assert wa.update(net) == resumed.update(net)
    for a, b in zip(wa.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)


def test_wrapped_live_model_is_unwrapped():
    net, gen = _net(), torch.Generator().manual_seed(8)
    wrapped = nn.DataParallel(net)
    wa = WeightAverage(wrapped, tau=0.0)
    assert list(wa.module.state_dict()) == list(net.state_dict())  # no "module." prefix
    _train_step(net, gen)
    wa.update(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(wa.module.parameters(), net.parameters()))


def test_ddp_wrapped_model(tmp_path):
    """A real single-process gloo DDP wrapper."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = _net()
        ddp = nn.parallel.DistributedDataParallel(net)
        wa = WeightAverage(ddp, tau=0.5, warmup_steps=1)  # step 0 in warm-up: a copy
        with torch.no_grad():
            net[0].weight.add_(1.0)
        wa.update(ddp)
        assert torch.equal(wa.module[0].weight, net[0].weight)
    finally:
        dist.destroy_process_group()


def test_from_config_and_bad_inputs():
    cfg = TrainConfig(epochs=400, ema_tau=0.995, ema_warmup_frac=0.025, ema_bn="average")
    wa = WeightAverage.from_config(_net(), cfg, steps_per_epoch=98)
    assert (wa.warmup_steps, wa.tau, wa.bn) == (980, 0.995, "average")
    with pytest.raises(ConfigError, match="ema_bn"):
        WeightAverage(_net(), bn="alias")
    with pytest.raises(ValueError, match="tau"):
        WeightAverage(_net(), tau=1.5)
    with pytest.raises(ValueError, match="parameters"):
        WeightAverage(_net()).update(nn.Linear(2, 2))
