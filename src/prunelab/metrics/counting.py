"""Parameter and non-zero counts, per layer and in total.

"Non-zero" counts what pruning left: zeros count as pruned only where pruning acts, in masked
tensors and in prunable parameters (the weights of Linear, convolutions, embeddings...). Every
other parameter (biases, normalisation scales and shifts) counts whole, zero or not: a BatchNorm
bias that happens to be 0 was not pruned, so an unpruned model has compression exactly 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from prunelab.sparsity import prunable_parameter_names


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


def prunable_zeros_count(module: nn.Module, name: str) -> bool:
    """Whether zeros in ``module``'s tensor ``name`` count as pruned: masked tensors, and
    prunable parameters (which may carry baked-in zeros after ``make_permanent``)."""
    return parametrize.is_parametrized(module, name) or name in prunable_parameter_names(module)


def nonzero_count(module: nn.Module, name: str, tensor: torch.Tensor) -> int:
    """The parameters of ``tensor`` that pruning left (see the module docstring)."""
    if prunable_zeros_count(module, name):
        return int(torch.count_nonzero(tensor))
    return tensor.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters left by pruning) as the forward sees them; shared tensors
    count once. Zeros count as pruned only in masked tensors and prunable layers' weights."""
    total = nonzero = 0
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in leaf_layers(model):
            for name, tensor, source in effective_tensors(module):
                if id(source) in seen:
                    continue
                seen.add(id(source))
                total += tensor.numel()
                nonzero += nonzero_count(module, name, tensor)
    return total, nonzero
