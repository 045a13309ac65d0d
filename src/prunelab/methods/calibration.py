"""Input statistics for methods that weigh weights by the activations they multiply."""

from __future__ import annotations

import torch
from torch import nn


def input_channel_sq_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a layer's input per input feature/channel (summed over batch, space)."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return x.pow(2).reshape(-1, x.shape[-1]).sum(0)
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    return x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)


def per_weight_input_norm(module: nn.Module, channel_norms: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel norm to the layer's weight shape (groups handled)."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return channel_norms.unsqueeze(0).expand_as(weight)
    kernel = [1] * len(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight: (in, out/groups, *k); the input channel is dim 0.
        return channel_norms.view(-1, 1, *kernel).expand_as(weight)
    groups = module.groups
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    per_group = channel_norms.view(groups, 1, in_per_group)
    per_out = per_group.expand(groups, out_channels // groups, in_per_group)
    return per_out.reshape(out_channels, in_per_group, *kernel).expand_as(weight)
