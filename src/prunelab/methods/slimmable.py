"""Slimmable networks in the sweep: a supernet trained once, one width exported per target."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import (
    ALL_LAYERS,
    Count,
    Fraction,
    LayerSelection,
    Method,
    Sandwich,
    Width,
    register_method,
)
from prunelab.structured.graph import _restore, as_example
from prunelab.training.trainer import Callback

#: Bisection steps for a US-Net's width (2⁻²⁰ of the range: far below one channel).
SEARCH_STEPS = 20
#: Training batches the supernet's full width is recalibrated on after training (a US-Net).
CALIBRATION_BATCHES = 8


@register_method("slimmable")
@dataclass
class SlimmableWidth(Method):
    """Slimmable networks (Yu et al.): train one supernet, then run it at the width a target asks.

    The dense model of the run is trained as a supernet (``prunelab.slim``): a US-Net over
    ``min_width``..1 with the sandwich rule (``sandwich`` widths per step) and inplace
    distillation, or with ``widths`` an S-Net with switchable BatchNorm. Each target
    (``speedup``: MACs reduction; ``sparsity``: the share of channels) then takes the widest
    uniform width that reaches it (a US-Net: any width, found by bisection; an S-Net: the widest
    of its list), recalibrates BatchNorm there on the calibration batches (US-Net), and exports
    a plain, physically narrow model that equals the supernet at that width. With
    ``recovery: none`` that is the slimmable network's own accuracy; ``scratch-e`` trains the
    same architecture individually, the paper's comparison. The papers' ablations are options:
    ``switchable_bn: false`` gives an S-Net one BatchNorm shared by all widths (the naive
    baseline), ``calibrate_bn: false`` exports a US-Net width with its training BatchNorm
    statistics instead of recalibrating them, ``sandwich`` and ``inplace_distillation`` switch
    the US-Net training rules. See docs/slimmable.md.
    """

    granularity: ClassVar[str] = "width"
    targets: ClassVar[tuple[str, ...]] = ("speedup", "sparsity")  # of MACs, or of channels
    scopes: ClassVar[tuple[str, ...]] = ("global",)  # one uniform width
    needs_data: ClassVar[bool] = True
    min_width: Fraction = 0.25
    widths: list[Width] | None = None
    sandwich: Sandwich = 4
    inplace_distillation: bool = True
    switchable_bn: bool = True
    calibrate_bn: bool = True
    round_to: Count = 1

    def __post_init__(self) -> None:
        if not self.switchable_bn and self.widths is None:
            raise InvalidValueError(
                "switchable_bn: false is the S-Net ablation (one BatchNorm for all widths): give "
                "widths too; a US-Net always shares its BatchNorm and calibrates it per width")
        if not self.calibrate_bn and self.widths is not None:
            raise InvalidValueError(
                "calibrate_bn: false is the US-Net ablation; an S-Net keeps private BatchNorm "
                "statistics per width and needs no calibration")

    def training_model(self, model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
        from prunelab import slim

        if self.widths is not None:
            return slim.convert(model, widths=self.widths, round_to=self.round_to,
                                switchable_bn=self.switchable_bn, example_input=example)
        return slim.convert(model, width_range=(self.min_width, 1.0), round_to=self.round_to,
                            example_input=example)

    def training_callbacks(self) -> list[Callback]:
        from prunelab.slim.training import SlimmableTraining

        return [SlimmableTraining(None, sandwich=self.sandwich,
                                  inplace_distillation=self.inplace_distillation,
                                  calibrate_batches=CALIBRATION_BATCHES)]

    def prune(self, model: nn.Module, sparsity: float, *, scope: str = "global",
              data: Iterable | None = None, selection: LayerSelection = ALL_LAYERS,
              target: str = "sparsity", example_input: torch.Tensor | None = None
              ) -> nn.Module:
        from prunelab import slim
        from prunelab.slim.supernet import is_slimmable

        if not is_slimmable(model):
            raise InvalidValueError(
                "the slimmable method prunes a supernet: train the dense model with it (a sweep "
                "does), or call prunelab.slim.convert and slim.train first")
        self.check_request(target, sparsity, scope)
        spec = slim.spec_of(model)
        if target == "speedup":
            full = spec.macs(spec.max_width)
            reached = lambda w: full / spec.macs(w) >= sparsity  # noqa: E731
        else:
            total = sum(g.size for g in spec.groups)
            reached = lambda w: 1 - sum(spec.counts(w)) / total >= sparsity  # noqa: E731
        chosen = self._widest(spec, reached, target, sparsity)
        if spec.universal and self.calibrate_bn and data is not None:
            slim.calibrate_bn(model, chosen, data)
        small = slim.export(model.eval(), chosen)
        _restore(model, small)
        as_example(model, example_input, data)  # the plain model runs
        return model

    def _widest(self, spec, reached, target: str, value: float) -> float:
        lo, hi = spec.min_width, spec.max_width
        if not reached(lo):
            raise InvalidValueError(
                f"a {value:g} {target} is out of reach of this supernet: its narrowest width "
                f"({lo:g}) is not enough; lower the target or train with a smaller min_width")
        if not spec.universal:
            return max(w for w in spec.widths if reached(w))
        if reached(hi):
            return hi
        for _ in range(SEARCH_STEPS):  # reached(lo) holds, reached(hi) does not
            middle = (lo + hi) / 2
            lo, hi = (middle, hi) if reached(middle) else (lo, middle)
        return lo
