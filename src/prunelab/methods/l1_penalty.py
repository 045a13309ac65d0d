"""L1 regularisation on weights: train with ``strength · Σ|w|``, then prune the smallest |w|."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import NonNegative, register_method
from prunelab.methods.learned import check_positive, gated_layers
from prunelab.methods.magnitude import MagnitudePruning
from prunelab.training import Callback, TrainState


def l1_penalty(model: nn.Module, strength: float) -> torch.Tensor:
    """``strength · Σ|w|`` over every Linear/Conv weight (masked weights count as zero)."""
    norms = [w.weight.abs().sum() for w in gated_layers(model)]
    return strength * torch.stack(norms).sum() if norms else torch.zeros(())


class WeightL1(Callback):
    """Adds ``strength · Σ|w|`` to the loss; its gradient is ``strength · sign(w)``."""

    def __init__(self, strength: float):
        self.strength = check_positive(strength, "L1 strength")

    def penalty(self, state: TrainState) -> torch.Tensor:
        return l1_penalty(state.model, self.strength)


@register_method("l1-penalty")
@dataclass
class L1Penalty(MagnitudePruning):
    """L1 on weights: train with ``strength · Σ|w|`` on every Linear/Conv weight (the harness
    trains with ``training_callbacks``), which drives unimportant weights towards zero, then
    prune the smallest |w| to the target, as magnitude pruning does.
    """

    strength: NonNegative = 1e-5

    def training_callbacks(self) -> list[Callback]:
        return [WeightL1(self.strength)]
