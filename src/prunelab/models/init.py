"""Weight initialisation shared by the zoo's CIFAR models."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """He (fan-out) init for convolutions, BatchNorm at identity, and linear layers drawn from
    N(0, ``linear_std``) with zero bias (``None`` keeps PyTorch's default for them)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
