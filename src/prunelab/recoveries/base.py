"""The recovery contract: what a run does after (and between) pruning steps.

A recovery is a registered :class:`~prunelab.strategies.Strategy`. The schedule calls
:meth:`Recovery.between` after each pruning step (fine-tune, or rewind and retrain), telling it
whether the step was the last; :meth:`Recovery.finish` then gets the pruned model and returns
the final one (Scratch-E/B re-initialise and train it from scratch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from prunelab.methods import Method
from prunelab.registry import Registry
from prunelab.strategies import Strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.experiment_config import ExperimentConfig

RECOVERIES: Registry[type[Recovery]] = Registry("recovery")


class Recovery(Strategy):
    """Base of recoveries; by default nothing happens after pruning."""

    registry: ClassVar[Registry] = RECOVERIES

    def snapshot_epochs(self) -> set[int]:
        """Epochs of dense training whose weights this recovery needs (rewinding)."""
        return set()

    def check(self, method: type[Method], config: ExperimentConfig) -> None:
        """Refuse, before any training, a method or setting this recovery cannot work with."""

    def between(self, model: nn.Module, run: Run, final: bool) -> None:
        """After a pruning step (``final``: the schedule's last one)."""

    def finish(self, model: nn.Module, run: Run) -> nn.Module:
        """After the schedule: the model the run reports."""
        return model
