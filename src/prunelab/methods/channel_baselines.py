"""Baselines for channel pruning: random channels and the L2 norm of filters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.methods.base import register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.scores import filter_norms


@register_method("random-channel")
@dataclass
class RandomChannelPruning(StructuredMethod):
    """Random channel pruning: the structured control (uniform scores, ``seed`` fixes them)."""

    decides: ClassVar[str] = "chance: uniform random channel scores (a control)"

    seed: int = 0

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(g.size, generator=generator) for g in groups]


@register_method("l2-channel")
@dataclass
class L2ChannelPruning(StructuredMethod):
    """L2-norm channel pruning: remove channels whose producing filters have the smallest ‖F‖₂.

    For channels shared across a residual addition the norms of all producing layers are summed.
    """

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        return [filter_norms(g, p=2) for g in groups]
