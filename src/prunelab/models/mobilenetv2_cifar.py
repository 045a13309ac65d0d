"""MobileNetV2 (Sandler et al. 2018, "Inverted Residuals and Linear Bottlenecks") for 32x32 inputs.

The ImageNet network downsamples 32x; on CIFAR that would leave a 1x1 map after the 4th stage.
The usual adaptation, kept here, is stride 1 in the first convolution and in the 24-channel stage
(8x downsampling in total). Everything else follows the paper's table: expansion 6, ReLU6, linear
bottlenecks, a 1x1 convolution to 1280 channels, global average pooling and one linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models import check_image_shape, check_positive, register_model
from prunelab.models.init import init_weights

# (expansion t, output channels c, repeats n, stride s of the first repeat), CIFAR strides.
CIFAR_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
MIN_SIZE = 8  # three stride-2 stages still leave a 1x1 map


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def conv_bn_relu6(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Bias-free ``kernel`` x ``kernel`` convolution ("same" padding), BatchNorm, ReLU6."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; a residual add when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = round(in_channels * expansion)
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:  # an explicit add, so structured pruners' dependency graphs trace it
            return x + self.conv(x)
        return self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 with CIFAR strides; ``width_mult`` scales every layer's channels."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], width_mult: float = 1.0):
        super().__init__()
        in_channels, _, _ = check_image_shape(input_shape, "mobilenetv2-cifar", MIN_SIZE)
        width_mult = check_positive("width_mult", width_mult)
        channels = round_channels(STEM_CHANNELS * width_mult)
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3, stride=1)]
        for expansion, out, repeats, stride in CIFAR_TABLE:
            out_channels = round_channels(out * width_mult)
            for repeat in range(repeats):
                block_stride = stride if repeat == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, block_stride, expansion))
                channels = out_channels
        last = round_channels(LAST_CHANNELS * max(1.0, width_mult))
        layers.append(conv_bn_relu6(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("mobilenetv2-cifar")
def mobilenetv2_cifar(
    num_classes: int, input_shape: tuple[int, ...], width_mult: float = 1.0
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018) with CIFAR strides (8x downsampling), 2.2M params."""
    return CifarMobileNetV2(num_classes, input_shape, width_mult)
