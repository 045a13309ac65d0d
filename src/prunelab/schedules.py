"""When to prune: one-shot, iterative (geometric rounds), gradual (AGP), and how to recover.

A schedule is a function that takes a model, a :class:`Pruner` (what to prune with) and a target,
and calls a ``recover`` function after pruning (fine-tune, rewind-and-retrain, or nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.checkpoint import load_state_dict
from prunelab.errors import InvalidValueError
from prunelab.methods import LayerSelection
from prunelab.pruning import prune
from prunelab.sparsity import check_sparsity, mask_sparsity
from prunelab.training.trainer import Callback, TrainState

Recover = Callable[[nn.Module], Any]


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


def one_shot(
    model: nn.Module, pruner: Pruner, sparsity: float, recover: Recover | None = None
) -> nn.Module:
    """Prune once to ``sparsity``, then recover."""
    pruner(model, sparsity)
    if recover is not None:
        recover(model)
    return model


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


def agp_sparsity(step: int, *, final: float, initial: float, start: int, steps: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n Δt))³, clamped to the ramp."""
    if steps <= 0:
        return final
    progress = min(max((step - start) / steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Automated gradual pruning (AGP) during training: sparsity follows the cubic ramp.

    The ramp starts at ``start`` and ends at ``end`` (fractions of the run) and the masks are
    updated every ``frequency`` optimiser steps; the rest of training recovers at the final
    sparsity.
    """

    def __init__(
        self,
        pruner: Pruner,
        final_sparsity: float,
        *,
        initial_sparsity: float = 0.0,
        start: float = 0.0,
        end: float = 0.75,
        frequency: int = 100,
    ):
        self.pruner = pruner
        self.final = check_sparsity(final_sparsity, "final sparsity")
        self.initial = check_sparsity(initial_sparsity, "initial sparsity")
        if not 0 <= start < end <= 1:
            raise InvalidValueError("AGP needs 0 <= start < end <= 1 (fractions of training)")
        if frequency < 1:
            raise InvalidValueError("AGP frequency must be at least one step")
        self.start, self.end, self.frequency = start, end, frequency
        self.applied: list[tuple[int, float]] = []

    def _ramp(self, state: TrainState) -> tuple[int, int]:
        first = int(self.start * state.total_steps)
        last = max(int(self.end * state.total_steps), first + 1)
        return first, last

    def on_step_begin(self, state: TrainState) -> None:
        first, last = self._ramp(state)
        on_grid = (state.step - first) % self.frequency == 0
        if state.step < first or state.step > last or not (on_grid or state.step == last):
            return  # masks change every `frequency` steps, and at the ramp's end
        target = agp_sparsity(
            state.step, final=self.final, initial=self.initial, start=first, steps=last - first
        )
        self._apply(state.model, target, state.step)

    def on_train_end(self, state: TrainState) -> None:
        if not self.applied or self.applied[-1][1] < self.final:
            self._apply(state.model, self.final, state.step)

    def _apply(self, model: nn.Module, target: float, step: int) -> None:
        if target > 0 and (not self.applied or target > self.applied[-1][1]):
            self.pruner(model, target)
            self.applied.append((step, target))


class Snapshot(Callback):
    """Keeps a copy of the weights at the start of epoch ``epoch`` (0 = initialisation).

    This is the rewind point of lottery-ticket training (Frankle & Carbin 2019; rewinding to an
    early epoch k, Frankle et al. 2020).
    """

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.state: dict[str, torch.Tensor] | None = None

    def _take(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_begin(self, state: TrainState) -> None:
        if self.epoch == state.epoch:
            self._take(state.model)

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        if state.epoch == self.epoch:
            self._take(state.model)


def rewind_weights(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights saved before pruning into a masked model, keeping its masks.

    A dense snapshot names a weight ``layer.weight``; under a mask it lives at
    ``layer.parametrizations.weight.original``. Pruned entries stay zero through the mask.
    """
    current = model.state_dict()
    merged = dict(current)
    for key, value in snapshot.items():
        if key.endswith(".mask") and ".parametrizations." in key:
            continue  # the model's own (newer) masks are kept
        prefix, _, attr = key.rpartition(".")
        target = key if key in current else f"{prefix}.parametrizations.{attr}.original"
        if target not in current:
            raise InvalidValueError(f"snapshot entry {key!r} has no place in this model")
        merged[target] = value
    return load_state_dict(model, merged)
