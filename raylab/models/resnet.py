"""ResNet-18, CIFAR variant (He et al. 2016 as used by the Sehwag et al. 2022 paper, Sehwag et al.; 11.17M parameters).

CIFAR stem: one 3x3 conv, no max-pool; post-activation BasicBlocks; 4x4 average pool. Module names follow the
common CIFAR ResNet layout (`conv1`, `bn1`, `layer1..4`, `linear`; reference `core/models/resnet.py`) so those
checkpoints load; normalization is inside the model with RobustBench-style `mean`/`std` buffers, like the WRNs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raylab.models.registry import check_input, register_model, register_normalization
from raylab.models.wideresnet import batchnorm, init_weights


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> act -> conv3x3 -> BN, plus (1x1 conv + BN when shape changes), then act."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = batchnorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = batchnorm(planes)
        self.act = activation()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), batchnorm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; `num_blocks` per stage of widths 64/128/256/512, strides 1/2/2/2."""

    def __init__(self, *, num_blocks: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        register_normalization(self, mean, std)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = batchnorm(64)
        self.act = activation()
        in_planes = 64
        for stage, (planes, stride, blocks) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks)):
            strides = [stride] + [1] * (blocks - 1)
            layer = [BasicBlock(p_in, planes, s, activation)
                     for p_in, s in zip([in_planes] + [planes] * (blocks - 1), strides)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        out = self.act(self.bn1(self.conv1((x - self.mean) / self.std)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
        out = F.avg_pool2d(out, 4)  # (N, 512, 1, 1)
        return self.linear(out.flatten(1))


@register_model("resnet18")
def resnet18(*, num_classes: int, mean: Sequence[float], std: Sequence[float],
             activation: type[nn.Module]) -> ResNet:
    return ResNet(num_blocks=(2, 2, 2, 2), num_classes=num_classes, mean=mean, std=std, activation=activation)
