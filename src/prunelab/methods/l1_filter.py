"""L1-norm filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import ALL_LAYERS, LayerSelection, register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.scores import filter_norms


def _resnet56(skip: set[int], stage_ratios: tuple[float, float, float]) -> dict[str, float]:
    """Li et al. number ResNet-56's convs 1..55; block j of stage s starts at 2 + 18(s-1) + 2j.
    Only the first conv of each block is pruned, skipped (sensitive) layers stay whole."""
    ratios = {}
    for stage in (1, 2, 3):
        for block in range(9):
            layer = 2 + 18 * (stage - 1) + 2 * block
            ratio = 0.0 if layer in skip else stage_ratios[stage - 1]
            ratios[f"layer{stage}.{block}.conv1"] = ratio
    return ratios


def _vgg16_a() -> dict[str, float]:
    """VGG-16-pruned-A: half the filters of conv 1 and convs 8-13, the others whole."""
    convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # features.N of vgg16-cifar
    pruned = {1, 8, 9, 10, 11, 12, 13}
    return {f"features.{n}": (0.5 if i in pruned else 0.0) for i, n in enumerate(convs, 1)}


#: The per-layer settings of Li et al. 2017 for the zoo's CIFAR models.
PRESETS = {
    "resnet56-a": lambda: _resnet56({16, 20, 38, 54}, (0.1, 0.1, 0.1)),
    "resnet56-b": lambda: _resnet56({16, 18, 20, 34, 38, 54}, (0.6, 0.3, 0.1)),
    "vgg16-a": _vgg16_a,
}


@register_method("l1-filter")
@dataclass
class L1FilterPruning(StructuredMethod):
    """L1-norm filter pruning (Li et al. 2017): remove the filters with the smallest ‖F‖₁.

    Filters are ranked within each layer by the sum of their absolute kernel weights and removed
    physically, with the feature maps they produce and the kernels that read them. As in the
    paper, channels tied across a residual addition are left alone (only the first conv of each
    ResNet block is pruned). ``preset`` applies the paper's per-layer ratios: ``resnet56-a``,
    ``resnet56-b`` (skipping the sensitive layers) or ``vgg16-a``; with a preset the target is
    ignored and the counts are the paper's exact ones unless ``round_to`` is given.
    """

    preset: str | None = None
    rejects = "as in the paper, channels tied across a residual addition stay"

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidValueError(
                f"unknown l1-filter preset {self.preset!r}; presets: {', '.join(PRESETS)}"
            )
        if self.preset is not None and self.round_to is None:
            self.round_to = 1  # the paper's architecture, on every machine (not its multiple)

    def accepts(self, group: ChannelGroup) -> bool:
        return not group.coupled

    def channel_count(self, ratio: float, size: int) -> int:
        """With a preset, round up as Li et al. do: it reproduces their Table 1 reductions
        (ResNet-56-A −10.4% FLOPs, B −27.5%; VGG-16-A −34.2%)."""
        if self.preset is None:
            return super().channel_count(ratio, size)
        return math.ceil(ratio * size - 1e-9)

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        return [filter_norms(g, p=1) for g in groups]

    def prune(self, model: nn.Module, sparsity: float, *, scope: str = "global",
              selection: LayerSelection = ALL_LAYERS, **kwargs) -> nn.Module:
        if self.preset is not None:
            selection = LayerSelection(layer_sparsity=PRESETS[self.preset](),
                                       include=tuple(PRESETS[self.preset]()))
            scope, sparsity, kwargs["target"] = "layer", 0.0, "sparsity"
        return super().prune(model, sparsity, scope=scope, selection=selection, **kwargs)
