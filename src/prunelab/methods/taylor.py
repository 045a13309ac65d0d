"""Gradient × weight (first-order Taylor) pruning."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import Count, UnstructuredMethod, register_method
from prunelab.methods.gradients import weight_gradients
from prunelab.sparsity import PrunableWeight


@register_method("taylor")
@dataclass
class TaylorPruning(UnstructuredMethod):
    """Gradient×weight (first-order Taylor): score |w · ∂L/∂w| over calibration batches.

    The gradient is the mean over every calibration sample (the full-batch gradient of those
    batches), taken with the model in eval mode so BatchNorm statistics are left untouched. The
    score estimates the change of the loss when the weight is set to zero. Needs labelled batches.
    """

    needs_data = True
    batches: Count | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        grads, samples = weight_gradients(model, weights, data, batches=self.batches,
                                          loss=self.loss, method="taylor")
        pairs = zip(weights, grads, strict=True)
        return [(w.weight.detach().float() * g / samples).abs() for w, g in pairs]
