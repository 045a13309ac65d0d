"""The LeNets of the pruning literature (Han et al. 2015, "Learning both Weights and Connections").

LeNet-300-100 and the Caffe variant of LeNet-5 are the standard MNIST pruning benchmarks; Han et
al. report their sizes (267K and 431K parameters) and compression rates on them.
"""

from __future__ import annotations

import math

from torch import nn

from prunelab.models import check_image_shape, register_model

# Caffe LeNet-5: two (5x5 valid conv, 2x2 max-pool) stages shrink each side n to (n - 4) // 2
# twice; at least one pixel must survive, which needs n >= 16.
LENET5_MIN_SIZE = 16


def _lenet5_side(n: int) -> int:
    return ((n - 4) // 2 - 4) // 2


@register_model("lenet-300-100")
def lenet_300_100(num_classes: int, input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Module:
    """LeNet-300-100: fully connected 300-100 ReLU network on the flattened input (Han et al.)."""
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("lenet-5")
def lenet_5(num_classes: int, input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Module:
    """LeNet-5 as in Caffe and Han et al.: conv20-pool-conv50-pool-fc500-fc (431K params on MNIST).

    Caffe's version has no non-linearity after the convolutions, only after the 500-unit layer;
    it is kept that way so parameter and FLOP counts match the published tables.
    """
    channels, height, width = check_image_shape(input_shape, "lenet-5", LENET5_MIN_SIZE)
    flat = 50 * _lenet5_side(height) * _lenet5_side(width)
    return nn.Sequential(
        nn.Conv2d(channels, 20, kernel_size=5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
