"""Work-arounds for CPU kernel bugs that training runs into.

oneDNN in torch 2.14 corrupts the heap ("double free or corruption", a segfault or a floating
point exception: the process dies) computing the gradients of a 1x1 convolution with stride > 1
over fewer than 8 input channels in channels_last. Found on a 2-core AMD EPYC (AVX2) training a
slimmable ResNet-20, whose shortcuts at width 0.25 are 4 -> 8 channel 1x1 stride-2 convolutions;
the same layer in NCHW, or with 8 input channels, trains. :func:`strided_pointwise_in_nchw` runs
exactly those convolutions in NCHW (a copy of a few channels), leaving every other layer in
channels_last.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

FEWEST_SAFE_CHANNELS = 8


def at_risk(module: nn.Module) -> bool:
    """A convolution the bug can hit (at some width): 1x1 kernel, stride > 1."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride != (1, 1))


@contextmanager
def strided_pointwise_in_nchw(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While inside, the model's 1x1 strided convolutions take NCHW weights and, when fewer than
    8 input channels arrive, NCHW inputs (see the module docstring)."""
    handles = []
    if enabled:
        for module in model.modules():
            if at_risk(module):
                # The weight (under a mask's parametrization too) and its mask: a 1x1 kernel in
                # channels_last counts as contiguous, so only a copy restrides it.
                for tensor in (*module.parameters(), *module.buffers()):
                    if tensor.dim() == 4:
                        tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
                handles.append(module.register_forward_pre_hook(_nchw_when_narrow))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _nchw_when_narrow(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.shape[1] < FEWEST_SAFE_CHANNELS
            and x.is_contiguous(memory_format=torch.channels_last)):
        return (x.contiguous(), *args[1:])
    return None
