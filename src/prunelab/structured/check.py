"""The removal check: a smaller model must compute what the masked model computes.

Removing a channel group is right exactly when the smaller model's output equals that of the
original model with the same channels *zeroed* (the producing filters, their biases and the
BatchNorm scales and shifts after them). That is checked on the example input after every
removal, with one forward of each model: a removal the dependency graph got wrong (a channel
shuffle, a reshape that mixes channels, a grouped convolution) gives a model that runs but
computes something else, and is refused by name instead of returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Tolerance of the check: |pruned - masked| <= RTOL * max|masked| + ATOL (ATOL only so that
#: exact zeros pass). Float32 summation order differs between the two models (measured: a few
#: 1e-7 relative); a wrong removal is off by far more.
RTOL, ATOL = 1e-4, 1e-12


def zeroable(module: nn.Module) -> bool:
    """Whether zeroing an output channel of ``module`` is how the masked model is made."""
    if isinstance(module, _BatchNorm):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed
    return isinstance(module, nn.Linear)


@contextmanager
def channels_zeroed(zeros: list[tuple[nn.Module, list[int]]]) -> Iterator[None]:
    """Zero output channels ``idxs`` of each module (weights, bias; a BatchNorm's scale and
    shift, or its running mean when it has none) for the duration, then restore them."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for module, idxs in zeros:
            tensors = [module.weight, module.bias]
            if isinstance(module, _BatchNorm) and module.weight is None:
                tensors = [module.running_mean]
            for tensor in tensors:
                if tensor is not None:
                    saved.append((tensor, tensor.detach().clone()))
                    tensor[idxs] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def outputs(model: nn.Module, example: torch.Tensor, head: nn.Module | None = None
            ) -> tuple[list[torch.Tensor], nn.Module | None]:
    """The model's output tensors on ``example`` in eval mode (a tuple or dict flattened), then
    the input of its last Conv/Linear (``head``, found in this forward when not given).

    The head's input is compared too because a classifier that starts at zero (ViT) or an
    untrained deep net whose activations fade would make a check on the outputs alone vacuous.
    """
    seen: list = [head, None]

    def record(module: nn.Module, args: tuple) -> None:
        if head is None or module is head:
            seen[:] = [module, args[0].detach().float()]

    watched = [head] if head is not None else [
        m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    hooks = [m.register_forward_pre_hook(record) for m in watched]
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, torch.Tensor):
        out = [out]
    found = [o.detach().float() for o in out if isinstance(o, torch.Tensor)]
    return found + ([seen[1]] if seen[1] is not None else []), seen[0]


def without(x: torch.Tensor, head: nn.Module, idxs: list[int]) -> torch.Tensor:
    """The head's input ``x`` less the channels ``idxs`` the removal takes from it."""
    if not idxs:
        return x
    dim = x.dim() - 1 if isinstance(head, nn.Linear) else 1
    keep = [i for i in range(x.shape[dim]) if i not in set(idxs)]
    return x.index_select(dim, torch.tensor(keep, dtype=torch.long, device=x.device))


def difference(pruned: list[torch.Tensor], masked: list[torch.Tensor]) -> dict[str, float]:
    """The largest |pruned - masked| and the largest |masked| over the outputs (same shapes)."""
    diff = max((float((p - m).abs().max()) for p, m in zip(pruned, masked, strict=True)
                if m.numel()), default=0.0)
    scale = max((float(m.abs().max()) for m in masked if m.numel()), default=0.0)
    return {"max_diff": diff, "scale": scale}


def mismatch(pruned: list[torch.Tensor], masked: list[torch.Tensor]) -> str | None:
    """None when the outputs agree to float tolerance, else how they differ."""
    if [p.shape for p in pruned] != [m.shape for m in masked]:
        return (f"output shapes {[tuple(p.shape) for p in pruned]} instead of "
                f"{[tuple(m.shape) for m in masked]}")
    for p, m in zip(pruned, masked, strict=True):
        found = difference([p], [m])
        if not found["max_diff"] <= RTOL * found["scale"] + ATOL:  # NaN is a mismatch too
            return f"output off by {found['max_diff']:.3g} at output scale {found['scale']:.3g}"
    return None
