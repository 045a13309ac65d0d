"""Gradient × weight (first-order Taylor) pruning."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.errors import InvalidValueError
from prunelab.methods.base import UnstructuredMethod, register_method
from prunelab.metrics.accuracy import task_loss
from prunelab.sparsity import PrunableWeight
from prunelab.utils import eval_mode, iter_batches


@register_method("taylor")
@dataclass
class TaylorPruning(UnstructuredMethod):
    """Gradient×weight (first-order Taylor): score |w · ∂L/∂w| over calibration batches.

    The gradient is the mean over every calibration sample (the full-batch gradient of those
    batches), taken with the model in eval mode so BatchNorm statistics are left untouched. The
    score estimates the change of the loss when the weight is set to zero. Needs labelled batches.
    """

    needs_data = True
    batches: int | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        loss_fn = self.loss or (lambda out, y: task_loss(out, y, reduction="sum"))
        grads = [torch.zeros_like(w.weight, dtype=torch.float32) for w in weights]
        samples = 0
        with eval_mode(model), torch.enable_grad():
            for x, y in iter_batches(data, model, self.batches):
                if y is None:
                    raise InvalidValueError("taylor needs labelled calibration batches (x, y)")
                with parametrize.cached():
                    # The exact tensors the forward uses: each holder's, for a shared tensor.
                    used = [{id(t): t for t in (getattr(m, p) for _, m, p in w.holders)}
                            for w in weights]
                    owners = [i for i, tensors in enumerate(used) for _ in tensors]
                    loss = loss_fn(model(x), y)
                    found = torch.autograd.grad(
                        loss, [t for tensors in used for t in tensors.values()],
                        allow_unused=True)
                    for i, g in zip(owners, found, strict=True):
                        if g is not None:  # None: a holder the forward did not use
                            grads[i] += g.float()
                samples += len(y)
        pairs = zip(weights, grads, strict=True)
        return [(w.weight.detach().float() * g / samples).abs() for w, g in pairs]
