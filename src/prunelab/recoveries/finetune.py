"""Fine-tuning and no recovery at all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn

from prunelab.recoveries.base import RECOVERIES, Recovery
from prunelab.strategies import register_strategy

if TYPE_CHECKING:
    from prunelab.experiment import Run


@register_strategy(RECOVERIES)
class FineTune(Recovery):
    """Fine-tune the pruned weights with the ``finetune`` recipe after every pruning step; the
    epoch is chosen on validation."""

    kind: Literal["finetune"] = "finetune"

    def between(self, model: nn.Module, run: Run, final: bool) -> None:
        run.finetune(model)


@register_strategy(RECOVERIES)
class NoRecovery(Recovery):
    """No recovery: report the pruned model as it is (one-shot accuracy)."""

    kind: Literal["none"] = "none"
