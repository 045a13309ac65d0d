"""Magnitude pruning (Han et al. 2015): remove the weights with the smallest |w|."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import UnstructuredMethod, register_method
from prunelab.sparsity import PrunableWeight


@register_method("magnitude")
@dataclass
class MagnitudePruning(UnstructuredMethod):
    """Magnitude pruning: score |w| (Han et al. 2015), globally or per layer.

    Iterated with fine-tuning between rounds it is the classic prune-retrain of Han et al. and,
    with rewinding, the lottery-ticket procedure. Needs no data.
    """

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        return [w.weight.detach().abs() for w in weights]
