"""Optimizer: weight-decay groups by module type, linear LR scaling, gradient clipping."""
import pytest
import torch
from torch import nn

from raylab.config import TrainConfig
from raylab.knobs import ConfigError
from raylab.train.optim import build_optimizer, clip_gradients, param_groups, scaled_lr


class Net(nn.Module):
    """Norm layers under names that do not say "batchnorm", and a conv whose name does."""

    def __init__(self):
        super().__init__()
        self.batchnorm_conv = nn.Conv2d(3, 4, 3, bias=False)   # name says batchnorm, type says conv: decayed
        self.stats = nn.BatchNorm2d(4)
        self.groups = nn.GroupNorm(2, 4)
        self.logits = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.shared = self.logits                               # shared module: its parameters count once

    def forward(self, x):
        return self.ln(self.logits(self.groups(self.stats(self.batchnorm_conv(x))).mean((2, 3))))


def _ids(params):
    return {id(p) for p in params}


def test_groups_by_module_type():
    net = Net()
    decay, no_decay = param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([net.batchnorm_conv.weight, net.logits.weight, net.logits.bias])
    norms = [net.stats.weight, net.stats.bias, net.groups.weight, net.groups.bias, net.ln.weight, net.ln.bias]
    assert _ids(no_decay["params"]) == _ids(norms)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_build_optimizer_settings_and_frozen_params():
    net = Net()
    net.logits.bias.requires_grad_(False)
    opt = build_optimizer(net, TrainConfig(lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4), 512)
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert g["lr"] == 0.2 and g["momentum"] == 0.9 and g["nesterov"]
    assert id(net.logits.bias) not in _ids(p for g in opt.param_groups for p in g["params"])


def test_ddp_like_wrapper_gives_same_groups():
    net = Net()
    wrapped = nn.DataParallel(net)  # on CPU a plain wrapper with `.module`, as DDP is
    assert [len(g["params"]) for g in param_groups(wrapped, 1e-4)] == [3, 6]


def test_linear_lr_scaling():
    assert scaled_lr(TrainConfig(lr=0.1, lr_base_batch=256), 1024) == pytest.approx(0.4)
    assert scaled_lr(TrainConfig(lr=0.1, lr_base_batch=0), 1024) == 0.1
    opt = build_optimizer(Net(), TrainConfig(lr=0.1, lr_base_batch=256), 128)
    assert all(g["lr"] == pytest.approx(0.05) for g in opt.param_groups)


def test_weight_decay_actually_skips_norm_params():
    net = Net()
    opt = build_optimizer(net, TrainConfig(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.1), 1)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # only weight decay moves parameters: p <- p - lr*wd*p
    assert torch.all(net.stats.weight == 1.0) and torch.all(net.ln.bias == 1.0)
    assert torch.allclose(net.logits.bias, torch.full_like(net.logits.bias, 0.9))


def test_clip_gradients():
    net = Net()
    net(torch.rand(2, 3, 6, 6)).pow(2).sum().mul(1e3).backward()
    assert clip_gradients(net, 0.0) is None
    norm = clip_gradients(net, 1.0)
    assert norm > 1.0
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert total == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients(net, -1.0)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="nesterov"):
        build_optimizer(Net(), TrainConfig(momentum=0.0, nesterov=True), 8)
    with pytest.raises(ValueError, match="global_batch"):
        build_optimizer(Net(), TrainConfig(), 0)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(Net().requires_grad_(False), TrainConfig(), 8)
