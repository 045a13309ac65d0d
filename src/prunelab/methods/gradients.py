"""Loss gradients with respect to the weights as the network uses them (masked, shared).

Gradient-based criteria (Taylor, SNIP, GraSP) need ∂L/∂w for the *effective* tensor of each
prunable weight: the masked product under a mask, and for a tensor shared by several modules the
sum over its holders. The model runs in eval mode, so BatchNorm statistics are left untouched, and
``.grad`` is never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.errors import InvalidValueError
from prunelab.metrics.accuracy import task_loss
from prunelab.sparsity import PrunableWeight
from prunelab.utils import eval_mode, iter_batches

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def summed_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch (so batches add up to the full-data gradient); a
    language model's per-position outputs are flattened first (:func:`task_loss`)."""
    return task_loss(out, y, reduction="sum")


@contextmanager
def used_tensors(weights: list[PrunableWeight]) -> Iterator[tuple[list[torch.Tensor], list[int]]]:
    """Inside ``parametrize.cached()``: the tensors the forward will use (each holder's, for a
    shared tensor) and, for each, the index of the weight it belongs to."""
    with parametrize.cached():
        used = [{id(t): t for t in (getattr(m, p) for _, m, p in w.holders)} for w in weights]
        owners = [i for i, tensors in enumerate(used) for _ in tensors]
        yield [t for tensors in used for t in tensors.values()], owners


def labelled_batches(data: Iterable | None, model: nn.Module, limit: int | None,
                     method: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration batches, refusing data without labels (the loss needs them)."""
    if data is None:
        raise InvalidValueError(f"{method} needs labelled calibration batches (x, y): pass "
                                "data=<iterable of (inputs, labels)>")
    for x, y in iter_batches(data, model, limit):
        if y is None:
            raise InvalidValueError(f"{method} needs labelled calibration batches (x, y), got "
                                    "inputs without labels")
        yield x, y


def accumulate(grads: list[torch.Tensor], owners: list[int],
               found: Iterable[torch.Tensor | None]) -> None:
    """Add each holder's gradient to its weight's total (None: a holder the forward skipped)."""
    for i, g in zip(owners, found, strict=True):
        if g is not None:
            grads[i] += g.detach().float()


def weight_gradients(model: nn.Module, weights: list[PrunableWeight], data: Iterable | None,
                     *, batches: int | None = None, loss: Loss | None = None,
                     method: str = "method") -> tuple[list[torch.Tensor], int]:
    """Σ over the calibration samples of ∂L/∂w for each weight, and the number of samples."""
    loss_fn = loss or summed_cross_entropy
    grads = [torch.zeros_like(w.weight, dtype=torch.float32) for w in weights]
    samples = 0
    with eval_mode(model), torch.enable_grad():
        for x, y in labelled_batches(data, model, batches, method):
            with used_tensors(weights) as (tensors, owners):
                value = loss_fn(model(x), y)
                accumulate(grads, owners,
                           torch.autograd.grad(value, tensors, allow_unused=True))
            samples += len(y)
    return grads, samples
