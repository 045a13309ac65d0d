"""Iterative pruning (Han et al. 2015): prune in geometric rounds, recovering after each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.schedules.base import SCHEDULES, Pruner, Recover, Schedule
from prunelab.sparsity import check_sparsity, mask_sparsity
from prunelab.strategies import register_strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run


def iterative_sparsities(target: float, rounds: int, start: float = 0.0) -> list[float]:
    """Cumulative targets of ``rounds`` rounds that each remove the same fraction of what is left.

    From ``start`` sparsity, round r reaches ``1 - (1 - start) * ((1 - target) / (1 - start)) **
    (r / rounds)``; the last round reaches ``target``.
    """
    check_sparsity(target)
    check_sparsity(start, "start sparsity")
    if rounds < 1:
        raise InvalidValueError(f"rounds must be at least 1, got {rounds}")
    if start > target:
        raise InvalidValueError(f"the model is already {start:.3f} sparse, above {target}")
    keep = (1 - target) / (1 - start)
    return [1 - (1 - start) * keep ** (r / rounds) for r in range(1, rounds + 1)]


def iterative(
    model: nn.Module,
    pruner: Pruner,
    sparsity: float,
    rounds: int,
    recover: Recover | None = None,
) -> nn.Module:
    """Prune in ``rounds`` geometric steps to ``sparsity``, recovering after each (Han et al.).

    Starts from the model's current sparsity, so a second call continues where the first ended.
    """
    for target in iterative_sparsities(sparsity, rounds, start=mask_sparsity(model)):
        pruner(model, target)
        if recover is not None:
            recover(model)
    return model


@register_strategy(SCHEDULES)
class Iterative(Schedule):
    """Iterative pruning: ``rounds`` rounds that each remove the same fraction of the weights
    left, recovering after every round (Han et al. 2015's prune-retrain; with rewinding, the
    lottery ticket's iterative magnitude pruning)."""

    kind: Literal["iterative"] = "iterative"
    rounds: int = Field(3, ge=1)

    def run(self, run: Run) -> nn.Module:
        model = run.trained_copy()
        targets = iterative_sparsities(run.resolve_sparsity(model), self.rounds,
                                       start=mask_sparsity(model))
        for i, target in enumerate(targets):
            run.pruner(model, target)
            run.recovery.between(model, run, final=i == len(targets) - 1)
        return model
