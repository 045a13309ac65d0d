"""FLOPs from :mod:`torch.utils.flop_counter`, dense and effective.

Conventions, stated once: a **MAC** is one multiply-accumulate; **FLOPs = 2 × MACs**, the unit
``torch.utils.flop_counter`` reports. Only matrix products and convolutions are counted (what every
published FLOP table counts); activations, normalisation and pooling are not. *Effective* FLOPs
scale each prunable layer's FLOPs by the fraction of its weights that are non-zero: with
unstructured sparsity, each weight takes part in the same number of MACs, so this is exactly the
work left if zero weights are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.utils import eval_mode


def as_inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    return tuple(example_input)


def flops_per_module(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward, and FLOPs attributed to each module (by qualified name).

    A module's count includes its children; the root is named ``""``.
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(*as_inputs(example_input))
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module
