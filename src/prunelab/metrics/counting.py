"""Parameter and non-zero counts, per layer and in total."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList


def effective_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """A module's own parameters as ``(name, tensor the forward sees, trainable source)``.

    For a masked weight the forward sees ``original * mask`` while the trainable source is
    ``original``; the source identifies tensors shared between layers.
    """
    for name, param in module.named_parameters(recurse=False):
        yield name, param, param
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            yield name, getattr(module, name), plist.original


def leaf_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters directly (skipping parametrize's internal containers)."""
    for name, module in model.named_modules():
        if isinstance(module, ParametrizationList) or ".parametrizations." in f".{name}.":
            continue
        if next(effective_tensors(module), None) is not None:
            yield name, module


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters) as the forward sees them; shared tensors count once."""
    total = nonzero = 0
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in leaf_layers(model):
            for _, tensor, source in effective_tensors(module):
                if id(source) in seen:
                    continue
                seen.add(id(source))
                total += tensor.numel()
                nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero
