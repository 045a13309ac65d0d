"""The schedule contract: *when* a run prunes, and a :class:`Pruner` that does the pruning.

A schedule is a registered :class:`~prunelab.strategies.Strategy`. Given a run in progress (the
trained dense model, the method, the target, the recovery), it produces the pruned model: once
(``one-shot``), in rounds with recovery in between (``iterative``), while training (``gradual``),
and so on. The method says *what* is removed and *how* it is scored; the recovery says what
happens after pruning; the schedule only says when.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import LayerSelection, Method
from prunelab.pruning import prune
from prunelab.registry import Registry
from prunelab.strategies import Strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.recoveries import Recovery

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
Recover = Callable[[nn.Module], Any]  # what the functional schedules call after each step


class Schedule(Strategy):
    """Base of schedules; subclasses implement :meth:`run`."""

    registry: ClassVar[Registry] = SCHEDULES
    #: Whether structured (channel) methods can follow this schedule.
    structured: ClassVar[bool] = False

    def check(self, method: type[Method], recovery: Recovery) -> None:
        """Refuse, before any training, a method or recovery this schedule cannot work with."""
        if method.granularity != "unstructured" and not self.structured:
            raise ConfigError(f"structured method {method.name!r} prunes one-shot; set "
                              f"schedule.kind to one-shot (not {self.kind})")

    def run(self, run: Run) -> nn.Module:
        """Return the pruned model of ``run`` (recovered between steps where that applies)."""
        raise NotImplementedError


@dataclass
class Pruner:
    """A method with its options and layer selection, ready to prune to a given sparsity."""

    method: str
    scope: str = "global"
    options: Mapping[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_last: bool = False
    layer_sparsity: Mapping[str, float] = field(default_factory=dict)
    data: Iterable | None = None

    def __call__(self, model: nn.Module, value: float, target: str = "sparsity",
                 example_input: torch.Tensor | None = None) -> nn.Module:
        """Prune ``model`` to ``value``: a sparsity, or a ``compression``/``speedup`` target."""
        return prune(
            model,
            self.method,
            scope=self.scope,
            data=self.data,
            example_input=example_input,
            include=self.include,
            exclude=self.exclude,
            exclude_first=self.exclude_first,
            exclude_last=self.exclude_last,
            layer_sparsity=self.layer_sparsity,
            **{target: value},
            **self.options,
        )

    def selection(self) -> LayerSelection:
        """The layer selection as the methods see it."""
        return LayerSelection(
            include=self.include, exclude=tuple(self.exclude), exclude_first=self.exclude_first,
            exclude_last=self.exclude_last, layer_sparsity=dict(self.layer_sparsity),
        )
