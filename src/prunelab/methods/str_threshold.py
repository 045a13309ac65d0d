"""Soft Threshold Reparameterization (STR; Kusupati et al. 2020): learned per-layer thresholds.

Every layer's weight is used as ``S(w) = sign(w) · relu(|w| − g(s))`` with ``g = sigmoid`` and one
trainable ``s`` per layer. Gradients flow through the ReLU (weights under the threshold get none
from the loss) and into ``s``, and weight decay on ``s`` (the recipe's ``weight_decay``) pulls it
towards 0, i.e. raises the threshold: that balance is what sets each layer's sparsity. The
weights under the threshold are exactly zero, so at the end they become the mask and ``S(w)``
becomes the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import register_method
from prunelab.methods.learned import GateCallback, LearnedMaskMethod, LearnedWeight
from prunelab.sparsity import PrunableWeight
from prunelab.training import Callback


class SoftThreshold(LearnedWeight):
    """``w -> sign(w) · relu(|w| − sigmoid(s))`` with a trainable scalar ``s``."""

    def __init__(self, s_init: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def threshold(self) -> torch.Tensor:
        return torch.sigmoid(self.s)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.sign(weight) * torch.relu(weight.abs() - self.threshold())


class STRCallback(GateCallback):
    """Installs a soft threshold on every Linear/Conv weight; bakes ``S(w)`` at the end."""

    def __init__(self, s_init: float):
        self.s_init = s_init

    def make_gate(self, weight: PrunableWeight) -> LearnedWeight:
        return SoftThreshold(self.s_init)


def thresholds(model: nn.Module) -> dict[str, float]:
    """Each layer's learned threshold g(s) (while training is under way)."""
    from prunelab.methods.learned import learned

    return {name: float(g.threshold()) for name, m in model.named_modules()
            if isinstance(g := learned(m), SoftThreshold)}


@register_method("str")
@dataclass
class SoftThresholdReparameterization(LearnedMaskMethod):
    """STR (Kusupati et al. 2020): learned per-layer thresholds, ``S(w) = sign(w)·relu(|w| −
    sigmoid(s))`` with ``s`` trained by the loss and the recipe's weight decay (which raises the
    threshold; a larger decay gives more sparsity). The harness trains with
    ``training_callbacks``; the weights below their threshold at the end are the mask, topped up
    by magnitude only if the target asks for more. ``s_init`` sets the starting threshold
    (sigmoid(−8) ≈ 3e-4: dense at the start).
    """

    s_init: float = -8.0

    def training_callbacks(self) -> list[Callback]:
        return [STRCallback(self.s_init)]
