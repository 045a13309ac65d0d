"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018).

Each weight (or each output neuron/filter) is multiplied by a gate ``z ∈ [0, 1]``. In training
``z`` is sampled from the hard-concrete distribution: ``u ~ U(0, 1)``,
``s = σ((log u − log(1 − u) + log α)/β)``, stretched to ``(γ, ζ) = (−0.1, 1.1)`` and clipped to
``[0, 1]``, so gates are exactly 0 or 1 with non-zero probability. The expected number of
non-zero gates, ``Σ σ(log α − β·log(−γ/ζ))``, is differentiable in ``log α`` and is the penalty
(times ``strength / N``, N training examples, as the paper scales it). At test time the gate is
deterministic: ``clip(σ(log α)·(ζ − γ) + γ, 0, 1)``, which reaches exact zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import register_method
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
    """``w -> w · z`` with one hard-concrete gate per weight or per output row."""

    def __init__(self, shape: tuple[int, ...], temperature: float, init_keep: float):
        super().__init__()
        self.temperature = check_positive(temperature, "temperature", strict=True)
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init_keep / (1 - init_keep))))

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        """Σ P(z ≠ 0) = Σ σ(log α − β·log(−γ/ζ))."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        z = self.gate()
        return weight * z.reshape(z.shape + (1,) * (weight.dim() - z.dim()))


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
        shape = shape[:1] if self.granularity == "neuron" else shape
        return HardConcreteGate(shape, self.temperature, self.init_keep)

    def penalty(self, state: TrainState) -> torch.Tensor:
        gates = [g for m in state.model.modules() if isinstance(g := learned(m), HardConcreteGate)]
        return self.strength * torch.stack([g.expected_l0() for g in gates]).sum() \
            / dataset_size(state)


@register_method("l0")
@dataclass
class L0Regularization(LearnedMaskMethod):
    """L0 regularisation with hard-concrete gates (Louizos et al. 2018), per weight or per
    output neuron/filter (``granularity``). Trained with ``strength · E[L0] / N`` (the paper's
    λ; N training examples); ``temperature`` is β (2/3 in the paper). At the end the
    deterministic test-time gates multiply the weights and their zeros are the mask (whole rows
    for ``neuron``), topped up by magnitude only if the target asks for more.
    """

    strength: float = 0.1
    granularity: Literal["weight", "neuron"] = "weight"
    temperature: float = 2 / 3
    init_keep: float = 0.9

    def __post_init__(self) -> None:
        self.training_callbacks()  # validates the options

    def training_callbacks(self) -> list[Callback]:
        return [L0Callback(self.strength, self.granularity, self.temperature, self.init_keep)]
