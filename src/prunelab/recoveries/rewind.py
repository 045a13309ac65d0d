"""Weight rewinding (lottery tickets): back to the weights of epoch k, then retrain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from prunelab.checkpoint import load_state_dict
from prunelab.errors import ConfigError, InvalidValueError
from prunelab.methods import Method
from prunelab.recoveries.base import RECOVERIES, Recovery
from prunelab.strategies import register_strategy
from prunelab.training.trainer import Callback, TrainState

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.experiment_config import ExperimentConfig


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


@register_strategy(RECOVERIES)
class Rewind(Recovery):
    """Rewind the surviving weights to their values at epoch ``rewind_epoch`` of dense training
    (0: the initialisation, Frankle & Carbin's lottery ticket; k > 0: Frankle et al. 2020) and
    retrain from that epoch with the training recipe, after every pruning step."""

    kind: Literal["rewind"] = "rewind"
    rewind_epoch: int = Field(0, ge=0)

    def snapshot_epochs(self) -> set[int]:
        return {self.rewind_epoch}

    def check(self, method: type[Method], config: ExperimentConfig) -> None:
        if config.dense == "pretrained":
            raise ConfigError("rewind needs the weights of dense training's early epochs, which "
                              "pretrained weights do not have; use dense: train")
        if self.rewind_epoch >= config.train.epochs:
            raise ConfigError(f"rewind_epoch {self.rewind_epoch} must be below the training "
                              f"epochs ({config.train.epochs})")
        if method.granularity != "unstructured":
            raise ConfigError(f"structured method {method.name!r} changes the architecture, so "
                              f"it cannot rewind; use finetune, scratch-e or scratch-b")

    def between(self, model: nn.Module, run: Run, final: bool) -> None:
        state = run.dense.snapshots.get(self.rewind_epoch)
        if state is None:
            raise ConfigError(f"no snapshot at epoch {self.rewind_epoch} to rewind to")
        rewind_weights(model, state)
        run.experiment.fit(model, run.experiment.config.train, run.seed, "rewind",
                           start_epoch=self.rewind_epoch)
