"""Width-switchable layers: a layer runs on a subset of its channels, with its own weights.

A converted layer keeps its class's parameters and names (so the supernet's state dict at full
width is the original's); it only *slices* them in ``forward``. Which channels are active is set
from outside (:func:`prunelab.slim.set_width`) as an index per side: ``None`` (all channels), a
``slice`` (the first k, a view) or a tensor of channel indices (after a concatenation the active
input channels of a reader are the first k of each branch, not a prefix).

Converted classes are made once per base class (``SlimConv2d`` from ``nn.Conv2d`` and so on) and
swapped onto the instances; :func:`restore_class` swaps them back for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Index = slice | torch.Tensor | None
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CLASSES: dict[type, type] = {}


def take(tensor: torch.Tensor | None, index: Index, dim: int = 0) -> torch.Tensor | None:
    """The active channels of ``tensor`` along ``dim`` (a view for prefixes)."""
    if tensor is None or index is None:
        return tensor
    if isinstance(index, slice):
        return tensor.narrow(dim, 0, index.stop)
    return tensor.index_select(dim, index.to(tensor.device))


def count(index: Index, full: int) -> int:
    """How many channels ``index`` selects out of ``full``."""
    if index is None:
        return full
    return index.stop if isinstance(index, slice) else len(index)


class SlimLayer:
    """Mixin of converted Conv/Linear layers: the active output and input channels."""

    slim_out: Index = None
    slim_in: Index = None
    slim_depthwise: bool = False
    slim_base: type


class SlimConv(SlimLayer):
    """A convolution on its active channels; a depthwise one keeps one group per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = take(self.weight, self.slim_out, 0)
        bias = take(self.bias, self.slim_out, 0)
        if not self.slim_depthwise:
            weight = take(weight, self.slim_in, 1)
        return self._conv_forward(x, weight, bias)  # groups is set with the width


class SlimLinear(SlimLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = take(take(self.weight, self.slim_out, 0), self.slim_in, 1)
        return F.linear(x, weight, take(self.bias, self.slim_out, 0))


class SlimBatchNorm(SlimLayer):
    """US-Net's BatchNorm: affine parameters shared (sliced); statistics per width.

    Training updates the shared running statistics of the active channels (the naive estimate,
    kept to show what calibration fixes); :func:`prunelab.slim.calibrate_bn` stores exact
    statistics for one width under its key in ``slim_calibrated``, and eval uses them when the
    active width has some.
    """

    slim_key: tuple | None = None
    slim_calibrated: dict
    slim_calibration: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.slim_out
        weight, bias = take(self.weight, index), take(self.bias, index)
        if self.slim_calibration is not None:
            return calibration_forward(self, x, weight, bias)
        stats = None if self.training else self.slim_calibrated.get(self.slim_key)
        if stats is not None:
            return F.batch_norm(x, stats[0], stats[1], weight, bias, False, 0.0, self.eps)
        if index is None:
            return super().forward(x)
        mean, var = take(self.running_mean, index), take(self.running_var, index)
        use_batch = self.training or mean is None
        momentum = self.momentum or 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(x, mean, var, weight, bias, use_batch, momentum, self.eps)
        if self.training and mean is not None and isinstance(index, torch.Tensor):
            with torch.no_grad():  # index_select copied them: write the update back
                self.running_mean[index] = mean
                self.running_var[index] = var
        return out


class SwitchableBatchNorm(nn.Module):
    """S-Net's switchable BatchNorm: one private BatchNorm (statistics and affine) per width.

    ``bns[i]`` normalises the active channels at the net's i-th width; a width's private
    layer starts as a copy of the original layer's values on those channels.
    """

    def __init__(self, base: nn.modules.batchnorm._BatchNorm, sizes: list[tuple[int, Index]]):
        super().__init__()
        self.num_features = base.num_features
        self.slim_base = type(base)
        self.bns = nn.ModuleList()
        for size, index in sizes:
            bn = type(base)(size, base.eps, base.momentum, base.affine, base.track_running_stats)
            with torch.no_grad():
                for name, tensor in [*base.named_parameters(recurse=False),
                                     *base.named_buffers(recurse=False)]:
                    if name != "num_batches_tracked":
                        getattr(bn, name).copy_(take(tensor, index))
            self.bns.append(bn)
        self.slim_choice = len(sizes) - 1
        self.slim_calibration: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bns[self.slim_choice]
        if self.slim_calibration is not None:
            return calibration_forward(bn, x, bn.weight, bn.bias, self.slim_calibration)
        return bn(x)


def calibration_forward(bn: nn.Module, x: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, state: list | None = None) -> torch.Tensor:
    """Normalise with the batch's statistics and add them to a cumulative average.

    ``state`` is ``[mean, var, batches]``: after n batches, mean and var are the plain averages
    of the n batch means and (unbiased) batch variances, as torch computes with
    ``momentum=None``; the training statistics play no part.
    """
    state = bn.slim_calibration if state is None else state
    if state[0] is None:
        channels = x.shape[1]
        state[0] = torch.zeros(channels, device=x.device, dtype=x.dtype)
        state[1] = torch.zeros(channels, device=x.device, dtype=x.dtype)
    state[2] += 1
    return F.batch_norm(x, state[0], state[1], weight, bias, True, 1.0 / state[2], bn.eps)


def slim_class(base: type) -> type:
    """The width-switchable subclass of a Conv/Linear/BatchNorm class (made once)."""
    if base not in _CLASSES:
        if issubclass(base, nn.modules.conv._ConvNd):
            mixin = SlimConv
        elif issubclass(base, nn.Linear):
            mixin = SlimLinear
        else:
            mixin = SlimBatchNorm
        _CLASSES[base] = type(f"Slim{base.__name__}", (mixin, base), {"slim_base": base})
    return _CLASSES[base]


def make_slim(module: nn.Module) -> None:
    """Turn ``module`` (a Conv/Linear/BatchNorm) into its switchable class, in place."""
    module.__class__ = slim_class(type(module))
    if isinstance(module, SlimBatchNorm):
        module.slim_calibrated = {}


def restore_class(module: nn.Module) -> None:
    """Make a switchable layer plain again (full width)."""
    if isinstance(module, SlimLayer):
        if isinstance(module, SlimConv) and module.slim_depthwise:
            module.groups = module.in_channels
        for name in ("slim_out", "slim_in", "slim_depthwise", "slim_key", "slim_calibrated",
                     "slim_calibration"):
            module.__dict__.pop(name, None)
        module.__class__ = module.slim_base
