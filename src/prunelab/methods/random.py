"""Random pruning: the control every comparison needs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.methods.base import UnstructuredMethod, register_method
from prunelab.sparsity import PrunableWeight


@register_method("random")
@dataclass
class RandomPruning(UnstructuredMethod):
    """Random unstructured pruning (uniform scores): the baseline any method must beat.

    ``seed`` fixes the draw, so the same seed prunes the same weights.
    """

    decides: ClassVar[str] = "chance: uniform random scores (a control, not a criterion)"

    seed: int = 0

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(w.weight.shape, generator=generator) for w in weights]
