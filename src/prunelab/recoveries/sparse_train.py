"""Training a network pruned at initialisation: static masks, SET or RigL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import Method
from prunelab.recoveries.base import RECOVERIES, Recovery
from prunelab.strategies import register_strategy
from prunelab.training.dynamic import DynamicSparsity

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.experiment_config import ExperimentConfig


@register_strategy(RECOVERIES)
class SparseTrain(Recovery):
    """Train the sparse network from its initial weights with the training recipe (same
    epochs as the dense model), after ``schedule: at-init``.

    ``update`` says what happens to the mask while training: ``static`` keeps it;
    ``set`` (Mocanu et al. 2018) drops the smallest-magnitude fraction ``drop_fraction`` of each
    layer's active weights every ``delta_t`` steps and regrows as many at random; ``rigl``
    (Evci et al. 2020) regrows those with the largest dense-gradient magnitude, with the drop
    fraction decayed on a cosine. Updates stop at ``update_end`` of training (default: 0.75 for
    RigL as in the paper, 1.0 for SET). New connections start at zero with their momentum
    reset; each layer keeps its number of weights. RigL's ERK start is the method's scope:
    ``{method: random, scope: erk}``.
    """

    kind: Literal["sparse-train"] = "sparse-train"
    update: Literal["static", "set", "rigl"] = "static"
    delta_t: int = Field(100, ge=1, description="optimiser steps between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="ζ (SET) or α (RigL)")
    update_end: float | None = Field(None, gt=0, le=1, description="fraction of training")

    def check(self, method: type[Method], config: ExperimentConfig) -> None:
        if config.schedule.kind != "at-init":
            raise ConfigError(
                f"recovery sparse-train trains a network pruned at initialisation; set "
                f"schedule to at-init (not {config.schedule.kind}), or recover a trained "
                "network with finetune, rewind or scratch-e/b")
        ignored = [name for name in ("delta_t", "drop_fraction", "update_end")
                   if getattr(self, name) != type(self).model_fields[name].default]
        if self.update == "static" and ignored:
            raise ConfigError(
                f"sparse-train with update: static keeps its mask, so {', '.join(ignored)} "
                "would be ignored: set update to set or rigl, or leave them out")

    def callbacks(self, seed: int) -> list[DynamicSparsity]:
        """The mask-update callback of ``update`` (none when static)."""
        if self.update == "static":
            return []
        rigl = self.update == "rigl"
        end = self.update_end if self.update_end is not None else (0.75 if rigl else 1.0)
        return [DynamicSparsity("gradient" if rigl else "random", drop_fraction=self.drop_fraction,
                                interval=self.delta_t, end=end, decay=rigl, seed=seed,
                                name=self.update)]

    def finish(self, model: nn.Module, run: Run) -> nn.Module:
        run.experiment.fit(model, run.experiment.config.train, run.seed,
                           f"sparse-train ({self.update})", self.callbacks(run.seed))
        return model
