"""SNIP (Lee et al. 2019): connection sensitivity at initialisation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import Count, UnstructuredMethod, register_method
from prunelab.methods.gradients import weight_gradients
from prunelab.sparsity import PrunableWeight


@register_method("snip")
@dataclass
class SNIP(UnstructuredMethod):
    """SNIP (Lee et al. 2019): connection sensitivity |∂L/∂c| = |g ⊙ w|, normalised, at init.

    Meant for an untrained network (``schedule: at-init``): the mask is chosen once, globally,
    before training, from the gradient of the loss on ``batches`` calibration batches (the
    paper uses one; ``None``: every batch given), and the sparse network then trains from its
    initial weights. The sensitivity of connection c is the derivative of the loss with respect
    to a multiplicative gate on it, which at c = 1 is g·w; scores are divided by their sum over
    all weights (the paper's normalisation). The model runs in eval mode, so BatchNorm
    statistics are untouched. Needs labelled batches.
    """

    needs_data = True
    batches: Count | None = 1

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        grads, _ = weight_gradients(model, weights, data, batches=self.batches, method="snip")
        sensitivity = [(w.weight.detach().float() * g).abs()
                       for w, g in zip(weights, grads, strict=True)]
        total = sum(float(s.sum()) for s in sensitivity)
        return [s / total if total > 0 else s for s in sensitivity]
