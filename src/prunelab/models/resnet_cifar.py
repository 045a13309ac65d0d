"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", section 4.2): depth 6n + 2.

A 3x3 convolution with 16 channels, then three stages of n basic blocks with 16, 32 and 64
channels (the second and third start with stride 2), global average pooling and one linear layer.

Shortcuts that change shape are projections (1x1 convolution with stride + BatchNorm, the
paper's option B), as in the code of "Rethinking the Value of Network Pruning" (Liu et al. 2019).
The paper's CIFAR tables use option A (zero padding, no parameters), so these models have two
projections more: +2,752 parameters and +262,144 MACs at 32x32 (+1.0% and +0.6% for ResNet-20).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models import check_image_shape, check_positive, register_model
from prunelab.models.init import init_weights

STAGE_CHANNELS = (16, 32, 64)
MIN_SIZE = 4  # two stride-2 stages still leave a 1x1 map


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + short x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # an explicit add, so the dependency graphs of structured pruners can trace it
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; ``width`` scales the 16/32/64 channel counts."""

    def __init__(
        self, depth: int, num_classes: int, input_shape: Sequence[int], width: float = 1.0
    ):
        super().__init__()
        name = f"resnet{depth}"
        in_channels, _, _ = check_image_shape(input_shape, name, MIN_SIZE)
        width = check_positive("width", width)
        blocks = (depth - 2) // 6
        channels = [max(1, round(c * width)) for c in STAGE_CHANNELS]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        stages = []
        previous = channels[0]
        for index, out_channels in enumerate(channels):
            layers = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(previous, out_channels, stride))
                previous = out_channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels[-1], num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016), basic blocks, projection shortcuts, 0.27M params."""
    return CifarResNet(20, num_classes, input_shape, width)


@register_model("resnet32")
def resnet32(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
    """ResNet-32 for CIFAR (He et al. 2016), basic blocks, projection shortcuts, 0.47M params."""
    return CifarResNet(32, num_classes, input_shape, width)


@register_model("resnet56")
def resnet56(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
    """ResNet-56 for CIFAR (He et al. 2016), basic blocks, projection shortcuts, 0.86M params."""
    return CifarResNet(56, num_classes, input_shape, width)


@register_model("resnet110")
def resnet110(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0) -> nn.Module:
    """ResNet-110 for CIFAR (He et al. 2016), basic blocks, projection shortcuts, 1.7M params."""
    return CifarResNet(110, num_classes, input_shape, width)
