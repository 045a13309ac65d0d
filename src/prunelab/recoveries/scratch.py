"""Training the pruned architecture from scratch: Scratch-E and Scratch-B (Liu et al. 2019)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import nn

from prunelab.metrics import measure
from prunelab.recoveries.base import RECOVERIES, Recovery
from prunelab.recoveries.rewind import rewind_weights
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
        recipe = run.experiment.config.train
        recipe = recipe.model_copy(update={"epochs": self.epochs(model, run)})
        run.experiment.fit(model, recipe, run.seed, self.kind)
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
    FLOPs_dense / FLOPs_pruned, capped at ``scratch_b_cap`` × for unstructured sparsity (2× by
    default, as in "Rethinking the Value of Network Pruning")."""

    kind: Literal["scratch-b"] = "scratch-b"
    scratch_b_cap: float = Field(2.0, ge=1, description="max epoch multiplier of Scratch-B")

    def epochs(self, model: nn.Module, run: Run) -> int:
        example = run.experiment.example
        factor = measure(run.dense.model, example).flops / max(
            measure(model, example).effective_flops, 1)
        if not structure_of(model):
            factor = min(factor, self.scratch_b_cap)
        return math.ceil(run.experiment.config.train.epochs * factor)
