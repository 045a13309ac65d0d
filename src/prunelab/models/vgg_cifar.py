"""CIFAR VGG with BatchNorm, as in Network Slimming (Liu et al. 2017) and "Rethinking the Value of
Network Pruning" (Liu et al. 2019): the channel-pruning benchmarks.

Simonyan & Zisserman's configurations A, D and E of 3x3 conv-BN-ReLU layers with max-pooling
between the five stages, then a global average pool and a single ``Linear(512, num_classes)``
instead of ImageNet VGG's three large fully connected layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models import check_image_shape, register_model
from prunelab.models.init import init_weights

# Output channels of each 3x3 conv, one tuple per stage; a max-pool separates the stages.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
# The reference code halves a 32x32 input five times (four max-pools, then a 2x2 average pool on
# the last 2x2 map); the global average pool here generalises that final pool to larger inputs.
MIN_SIZE = 32


class CifarVGG(nn.Module):
    """VGG of configuration ``config`` ('A', 'D' or 'E') for small images."""

    def __init__(self, config: str, num_classes: int, input_shape: Sequence[int], name: str):
        super().__init__()
        in_channels, _, _ = check_image_shape(input_shape, name, MIN_SIZE)
        layers: list[nn.Module] = []
        for index, stage in enumerate(CONFIGS[config]):
            if index > 0:
                layers.append(nn.MaxPool2d(2))
            for out_channels in stage:
                layers += [
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(),
                ]
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("vgg11-cifar")
def vgg11_cifar(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """VGG-11 (config A) with BatchNorm for CIFAR: 8 conv layers, GAP, one linear layer."""
    return CifarVGG("A", num_classes, input_shape, "vgg11-cifar")


@register_model("vgg16-cifar")
def vgg16_cifar(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """VGG-16 (config D) with BatchNorm for CIFAR: 13 conv layers, GAP, one linear layer."""
    return CifarVGG("D", num_classes, input_shape, "vgg16-cifar")


@register_model("vgg19-cifar")
def vgg19_cifar(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """VGG-19 (config E) with BatchNorm for CIFAR: 16 conv layers, GAP, one linear layer."""
    return CifarVGG("E", num_classes, input_shape, "vgg19-cifar")
