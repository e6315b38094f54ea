"""WideResNet-D-W in the DeepMind style (Gowal et al. 2020; reference `wideresnetwithswish.py`, RobustBench
`DMWideResNet`), the architecture of the Wang et al. 2023 paper.

Module and buffer names equal RobustBench's, so a raylab state_dict loads into `DMWideResNet` with strict=True
and back (the RobustBench version that registers `mean`/`std` as (3, 1, 1) buffers; checkpoints without them,
like the reference's `module.0.`-prefixed ones, go through `load_reference_state_dict`). Keys: `mean`, `std`,
`init_conv.weight`, `layer.{g}.block.{b}.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}`, `batchnorm`,
`logits`. Parameter counts: WRN-16-2 691,674; WRN-28-10 36,479,194; WRN-70-16
266,796,506 (10 classes; tests/models/test_models.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raylab.models.registry import check_input, register_model, register_normalization

# torch momentum 0.01 == Haiku decay 0.99 (the DeepMind JAX original); eps as torch's default.
BN_MOMENTUM = 0.01
BN_EPS = 1e-5

# TensorFlow "SAME" padding of conv_0: symmetric at stride 1, which the conv does itself (padding=1; an explicit
# F.pad copy per block cost ~9% of a TRADES step on CPU under torch.profiler), bottom/right only at stride 2, which
# needs the explicit pad. Padding is not in the state dict: checkpoints are unaffected.
_SAME_PAD = {1: None, 2: (0, 1, 0, 1)}


def batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class _Block(nn.Module):
    """Pre-activation block: BN -> act -> conv3x3(stride, SAME) -> BN -> act -> conv3x3, plus the shortcut.

    When the width changes, the *activated* input feeds both conv_0 and a 1x1 strided `shortcut` conv;
    otherwise the shortcut is the raw input (DeepMind design, kept for checkpoint compatibility).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        if stride not in _SAME_PAD:
            raise ValueError(f"WideResNet block stride: {stride} is not one of 1, 2")
        self.batchnorm_0 = batchnorm(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=int(stride == 1),
                                bias=False)
        self.batchnorm_1 = batchnorm(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
                         if self.has_shortcut else None)
        self._pad = _SAME_PAD[stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(act if self._pad is None else F.pad(act, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return out + (self.shortcut(act) if self.has_shortcut else x)


class _BlockGroup(nn.Module):
    """`num_blocks` blocks; only the first one changes width and stride."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 activation: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation)
            for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 RGB inputs in [0, 1]; returns logits (N, num_classes)."""

    def __init__(self, *, depth: int, width: int, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth: {depth} must be 6n+4 with n >= 1 (e.g. 16, 28, 34, 70)")
        register_normalization(self, mean, std)
        widths = (16, 16 * width, 32 * width, 64 * width)
        num_blocks = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(*[
            _BlockGroup(num_blocks, widths[g], widths[g + 1], stride, activation)
            for g, stride in enumerate((1, 2, 2))])
        self.batchnorm = batchnorm(widths[3])
        self.relu = activation()
        self.logits = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        out = F.avg_pool2d(out, 8)  # (N, 64W, 1, 1)
        return self.logits(out.flatten(1))


def init_weights(model: nn.Module) -> None:
    """Reference init: conv N(0, sqrt(2 / (k*k*out))) (He fan-out), BN gamma=1 beta=0, Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _wrn_factory(depth: int, width: int):
    def build(*, num_classes: int, mean: Sequence[float], std: Sequence[float],
              activation: type[nn.Module]) -> WideResNet:
        return WideResNet(depth=depth, width=width, num_classes=num_classes, mean=mean, std=std,
                          activation=activation)
    build.__name__ = f"wrn_{depth}_{width}"
    return build


# Wang et al. 2023: WRN-28-10 and WRN-70-16; Sehwag et al. 2022: WRN-34-10/34-20. The toys for 2 CPU cores: WRN-16-2
# and WRN-10-1/10-2 (one block per group; a 90 s calibration on 2 cores reached 82% clean, 54% PGD-10 on digits with
# WRN-10-1, where WRN-16-2 took only 19 steps).
for _depth, _width in ((10, 1), (10, 2), (16, 2), (28, 10), (34, 10), (34, 20), (70, 16)):
    register_model(f"wrn-{_depth}-{_width}")(_wrn_factory(_depth, _width))
