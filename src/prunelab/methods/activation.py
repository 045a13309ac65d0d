"""Activation-weighted magnitude pruning: |w_ij| · ‖x_j‖₂."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import UnstructuredMethod, register_method
from prunelab.methods.calibration import input_channel_sq_sums, per_weight_input_norm
from prunelab.sparsity import PrunableWeight
from prunelab.utils import eval_mode, iter_batches


@register_method("activation")
@dataclass
class ActivationPruning(UnstructuredMethod):
    """Activation-weighted magnitude: score |w_ij|·‖x_j‖, x_j the layer's j-th input over data.

    A weight that multiplies a large input matters more than its magnitude alone suggests. For
    convolutions x_j is input channel j over batch and space. ‖x_j‖ is the root mean square
    (the 2-norm over √count): within a layer that is the same ranking as the 2-norm, and across
    layers it keeps a conv's input, summed over every position, from outweighing a linear
    layer's (with the plain 2-norm, global pruning of a CIFAR ResNet-20 at 4x emptied its
    classifier). Inputs are captured with forward hooks in eval mode. Labels are not needed.
    """

    needs_data = True
    batches: int | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def recorder(name: str):
            def hook(module: nn.Module, inputs: tuple) -> None:
                value = input_channel_sq_sums(module, inputs[0])
                sums[name] = sums[name] + value if name in sums else value
                counts[name] = counts.get(name, 0) + inputs[0].numel() // value.numel()

            return hook

        handles = [w.module.register_forward_pre_hook(recorder(w.name)) for w in weights]
        try:
            with eval_mode(model), torch.no_grad():
                for x, _ in iter_batches(data, model, self.batches):
                    model(x)
        finally:
            for handle in handles:
                handle.remove()
        scores = []
        for w in weights:
            if w.name not in sums:  # a layer the forward never reached gets no activation credit
                scores.append(torch.zeros_like(w.weight, dtype=torch.float32))
                continue
            norm = per_weight_input_norm(w.module, (sums[w.name] / counts[w.name]).sqrt())
            scores.append(w.weight.detach().float().abs() * norm)
        return scores
