"""Training the pruned architecture from scratch: Scratch-E and Scratch-B (Liu et al. 2019).

Both follow the official code (github.com/Eric-mingjie/rethinking-network-pruning): a pruned
architecture is re-built with fresh weights; a mask keeps its pattern, and the fresh surviving
weights of each layer are drawn with the standard deviation of their *surviving* fan
(``cifar/weight-level/cifar_E.py``: ``n = mask.sum() / in_channels``, ``std = sqrt(2 / n)``), i.e.
the model's own initialisation scaled by 1/sqrt(density). Without that rescaling a 90%-sparse
LeNet-300-100 starts with activations ~3x too small and barely trains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from prunelab.metrics import measure
from prunelab.recoveries.base import RECOVERIES, Recovery
from prunelab.recoveries.rewind import rewind_weights
from prunelab.sparsity import get_mask, masked_parameters, original_weight
from prunelab.strategies import register_strategy
from prunelab.structured.graph import replay_structure, structure_of

if TYPE_CHECKING:
    from prunelab.experiment import Run

SCRATCH_SEED_OFFSET = 10_000  # Scratch-E/B start from a fresh draw, not the dense model's init


class _Scratch(Recovery):
    """Keep the pruned structure (mask, or smaller architecture), draw fresh weights, train.

    Between the steps of a multi-step schedule the model is fine-tuned, so the next step's
    mask is found as with fine-tuning; the last step's weights are thrown away anyway.
    """

    rescale_init: bool = Field(
        True, description="draw surviving weights with the std of their surviving fan "
                          "(official code); false: the dense initialisation under the mask")

    def between(self, model: nn.Module, run: Run, final: bool) -> None:
        if not final:
            run.finetune(model)

    def epochs(self, model: nn.Module, run: Run) -> int:
        return run.experiment.config.train.epochs

    def finish(self, model: nn.Module, run: Run) -> nn.Module:
        fresh = run.experiment.new_model(run.seed + SCRATCH_SEED_OFFSET)
        structure = structure_of(model)
        if structure:
            model = replay_structure(fresh, structure)
        else:
            rewind_weights(model, fresh.state_dict())
            if self.rescale_init:
                rescale_to_surviving_fan(model)
        recipe = run.experiment.config.train
        recipe = recipe.model_copy(update={"epochs": self.epochs(model, run)})
        run.experiment.fit(model, recipe, run.seed, self.kind)
        return model


def rescale_to_surviving_fan(model: nn.Module) -> nn.Module:
    """Scale each masked parameter by 1/sqrt(its density), in place.

    An initialisation with std ∝ 1/sqrt(fan) (Kaiming, Xavier, PyTorch's default) assumes every
    connection is there; under a mask of density d only d·fan are, so the surviving weights get the
    std of their surviving fan, as Liu et al.'s Scratch-E/B code draws them.
    """
    seen: set[int] = set()  # a tied weight is masked on every holder, scaled once
    with torch.no_grad():
        for _, module, name in masked_parameters(model):
            weight = original_weight(module, name)
            density = float(get_mask(module, name).float().mean())
            if id(weight) not in seen and density > 0:
                weight.mul_(density ** -0.5)
            seen.add(id(weight))
    return model


@register_strategy(RECOVERIES)
class ScratchE(_Scratch):
    """Scratch-E: the pruned architecture (or mask) with fresh random weights, trained for as
    many epochs as the dense model (Liu et al. 2019, "Rethinking the Value of Network
    Pruning")."""

    kind: Literal["scratch-e"] = "scratch-e"


@register_strategy(RECOVERIES)
class ScratchB(_Scratch):
    """Scratch-B: like Scratch-E, but trained for the dense model's compute budget: epochs ×
    FLOPs_dense / FLOPs_pruned (effective FLOPs for a mask, as the official code counts non-zero
    weights). No cap by default: the official code has none (``cifar/weight-level/cifar_B.py``,
    ``imagenet/weight-level/main_B.py``); ``scratch_b_cap`` bounds the multiplier when a very
    sparse model would otherwise train for many times the dense epochs."""

    kind: Literal["scratch-b"] = "scratch-b"
    scratch_b_cap: float | None = Field(None, ge=1, description="max epoch multiplier (none: "
                                                                "the full FLOPs ratio)")

    def epochs(self, model: nn.Module, run: Run) -> int:
        example = run.experiment.example
        factor = measure(run.dense.model, example).flops / max(
            measure(model, example).effective_flops, 1)
        if self.scratch_b_cap is not None:
            factor = min(factor, self.scratch_b_cap)
        return math.ceil(run.experiment.config.train.epochs * factor)
