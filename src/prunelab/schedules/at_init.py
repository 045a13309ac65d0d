"""Pruning at initialisation: the mask is chosen before any training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import Method
from prunelab.schedules.base import SCHEDULES, Schedule
from prunelab.strategies import register_strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run
    from prunelab.recoveries import Recovery

#: What can follow pruning at init: train the sparse net (static or dynamic), train the mask
#: from a fresh draw (Scratch-E/B: the random re-initialisation control), or nothing.
AFTER_INIT = ("sparse-train", "scratch-e", "scratch-b", "none")


@register_strategy(SCHEDULES)
class AtInit(Schedule):
    """Prune the freshly initialised model (the run seed's initialisation, the one the dense
    model started from) before any training, then hand it to the recovery: ``sparse-train``
    trains the sparse network from those initial weights with the training recipe (statically,
    or with SET/RigL updates). This is how SNIP, GraSP, SynFlow, random and magnitude-at-init
    compare, and with a per-layer scope (``erk``) how sparse-from-scratch training starts.

    Calibration data (SNIP, GraSP) are training batches. A layer left with no weight is refused.
    """

    kind: Literal["at-init"] = "at-init"

    def check(self, method: type[Method], recovery: Recovery) -> None:
        super().check(method, recovery)
        if recovery.kind not in AFTER_INIT:
            raise ConfigError(
                f"schedule at-init prunes an untrained network, so recovery {recovery.kind!r} "
                f"makes no sense (finetune would fine-tune an untrained net, rewind would "
                f"replace it by the dense run's weights); use one of: {', '.join(AFTER_INIT)}")

    def run(self, run: Run) -> nn.Module:
        model = run.experiment.new_model(run.seed)
        run.prune(model)
        run.recovery.between(model, run, final=True)
        return model
