"""One-shot pruning: prune once to the target, then recover."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from torch import nn

from prunelab.schedules.base import SCHEDULES, Pruner, Recover, Schedule
from prunelab.strategies import register_strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run


def one_shot(model: nn.Module, pruner: Pruner, sparsity: float,
             recover: Recover | None = None) -> nn.Module:
    """Prune once to ``sparsity``, then recover."""
    pruner(model, sparsity)
    if recover is not None:
        recover(model)
    return model


@register_strategy(SCHEDULES)
class OneShot(Schedule):
    """Prune the trained model once to the target, then recover (fine-tune, rewind, ...).

    Structured methods reach their target (channels, parameters or FLOPs) in this one step.
    """

    kind: Literal["one-shot"] = "one-shot"
    structured: ClassVar[bool] = True

    def run(self, run: Run) -> nn.Module:
        model = run.trained_copy()
        run.prune(model)
        run.recovery.between(model, run, final=True)
        return model
