"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018).

Each weight (or each neuron: an input unit of a Linear layer, an output filter of a convolution,
as in the authors' code) is multiplied by a gate ``z ∈ [0, 1]``. In training
``z`` is sampled from the hard-concrete distribution: ``u ~ U(0, 1)``,
``s = σ((log u − log(1 − u) + log α)/β)``, stretched to ``(γ, ζ) = (−0.1, 1.1)`` and clipped to
``[0, 1]``, so gates are exactly 0 or 1 with non-zero probability. The expected number of
non-zero weights, ``Σ_g |g|·σ(log α_g − β·log(−γ/ζ))`` (|g| the weights gate g multiplies: 1 per
weight, a column or a filter per neuron, the paper's group-sparsity form), is differentiable in
``log α`` and is the penalty (times ``strength / N``, N training examples, as the paper scales
it). At test time the gate is deterministic: ``clip(σ(log α)·(ζ − γ) + γ, 0, 1)``, which reaches
exact zeros. Gating a Linear layer's inputs rather than its outputs means a classifier's class
outputs are never switched off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import Fraction, NonNegative, Positive, register_method
from prunelab.methods.learned import (
    GateCallback,
    LearnedMaskMethod,
    LearnedWeight,
    check_positive,
    dataset_size,
    learned,
)
from prunelab.sparsity import PrunableWeight
from prunelab.training import Callback, TrainState

GAMMA, ZETA = -0.1, 1.1
GRANULARITIES = ("weight", "neuron")


class HardConcreteGate(LearnedWeight):
    """``w -> w · z`` with one hard-concrete gate per weight, or per slice of the weight along
    ``dim`` (``shape`` is then ``(weight.shape[dim],)``), each slice of ``group_size`` weights.
    ``log α`` is regularised by the expected L0 only (no weight decay), as in the paper."""

    no_weight_decay = True

    def __init__(self, shape: tuple[int, ...], temperature: float, init_keep: float,
                 dim: int = 0, group_size: int = 1):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature", strict=True)
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init_keep / (1 - init_keep))))
        self.dim, self.group_size = dim, group_size

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        """Expected non-zero weights: Σ |g|·P(z_g ≠ 0) = Σ |g|·σ(log α − β·log(−γ/ζ))."""
        open_probability = torch.sigmoid(
            self.log_alpha - self.temperature * math.log(-GAMMA / ZETA))
        return self.group_size * open_probability.sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        z = self.gate()
        if z.dim() == weight.dim():
            return weight * z
        shape = [1] * weight.dim()
        shape[self.dim] = z.numel()
        return weight * z.reshape(shape)


class L0Callback(GateCallback):
    """Installs gates and adds ``strength · E[L0] / N``; bakes ``w · z_test`` at the end."""

    def __init__(self, strength: float, granularity: str = "weight", temperature: float = 2 / 3,
                 init_keep: float = 0.9):
        self.strength = check_positive(strength, "L0 strength")
        self.temperature = check_positive(temperature, "temperature", strict=True)
        if granularity not in GRANULARITIES:
            raise InvalidValueError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if not 0 < init_keep < 1:
            raise InvalidValueError(f"init_keep is a probability in (0, 1), got {init_keep!r}")
        self.granularity, self.init_keep = granularity, init_keep

    def make_gate(self, weight: PrunableWeight) -> LearnedWeight:
        shape = tuple(weight.original.shape)
        if self.granularity == "weight":
            return HardConcreteGate(shape, self.temperature, self.init_keep)
        dim = 1 if isinstance(weight.module, nn.Linear) else 0  # input units / output filters
        return HardConcreteGate((shape[dim],), self.temperature, self.init_keep, dim=dim,
                                group_size=math.prod(shape) // shape[dim])

    def penalty(self, state: TrainState) -> torch.Tensor:
        gates = [g for m in state.model.modules() if isinstance(g := learned(m), HardConcreteGate)]
        return self.strength * torch.stack([g.expected_l0() for g in gates]).sum() \
            / dataset_size(state)


@register_method("l0")
@dataclass
class L0Regularization(LearnedMaskMethod):
    """L0 regularisation with hard-concrete gates (Louizos et al. 2018), per weight or per
    neuron (``granularity``: an input unit of each Linear layer, an output filter of each
    convolution, as in the authors' code). Trained with ``strength · E[L0] / N`` (the paper's
    λ; N training examples; E[L0] counts the weights a neuron's gate switches off, the paper's
    group form); ``temperature`` is β (2/3 in the paper). At the end the deterministic
    test-time gates multiply the weights and their zeros are the mask (whole input columns or
    filters for ``neuron``), topped up by magnitude only if the target asks for more.
    """

    strength: NonNegative = 0.1
    granularity: Literal["weight", "neuron"] = "weight"
    temperature: Positive = 2 / 3
    init_keep: Fraction = 0.9

    def training_callbacks(self) -> list[Callback]:
        return [L0Callback(self.strength, self.granularity, self.temperature, self.init_keep)]
