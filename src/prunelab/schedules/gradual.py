"""Automated gradual pruning (Zhu & Gupta 2017): sparsity rises on a cubic ramp while training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator
from torch import nn

from prunelab.errors import ConfigError, InvalidValueError
from prunelab.methods import Method
from prunelab.schedules.base import SCHEDULES, Pruner, Schedule
from prunelab.sparsity import check_sparsity
from prunelab.strategies import register_strategy
from prunelab.training.trainer import Callback, TrainState

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.recoveries import Recovery


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


@register_strategy(SCHEDULES)
class Gradual(Schedule):
    """Gradual pruning (AGP, Zhu & Gupta 2017) while fine-tuning the trained model: the sparsity
    follows s_t = s_f(1 − (1 − t/T)³) from ``agp_start`` to ``agp_end`` (fractions of the
    fine-tuning run), masks updated every ``agp_frequency`` steps (default: four times an epoch).

    The fine-tuning *is* the recovery, so the epoch is not chosen on validation (an earlier
    epoch has fewer weights pruned) and rewinding cannot follow.
    """

    kind: Literal["gradual"] = "gradual"
    agp_start: float = Field(0.0, ge=0, lt=1)
    agp_end: float = Field(0.75, gt=0, le=1)
    agp_frequency: int | None = Field(None, ge=1, description="steps between mask updates")

    @model_validator(mode="after")
    def _ramp(self) -> Gradual:
        if self.agp_start >= self.agp_end:
            raise ValueError("agp_start must be below agp_end (fractions of the fine-tuning run)")
        return self

    def check(self, method: type[Method], recovery: Recovery) -> None:
        super().check(method, recovery)
        if recovery.kind == "rewind":
            raise ConfigError("gradual pruning happens while fine-tuning: it cannot be "
                              "combined with rewinding (use one-shot or iterative)")

    def run(self, run: Run) -> nn.Module:
        model = run.trained_copy()
        sparsity = run.resolve_sparsity(model)
        recipe = run.experiment.config.finetune
        steps = len(run.experiment.loader("train", recipe.batch_size, run.seed, shuffle=True))
        agp = GradualPruning(run.pruner, sparsity, start=self.agp_start, end=self.agp_end,
                             frequency=self.agp_frequency or max(1, steps // 4))
        run.experiment.fit(model, recipe, run.seed, "gradual", [agp], keep_best=False)
        return model
