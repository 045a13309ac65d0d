"""Activation-weighted magnitude pruning: |w_ij| · ‖x_j‖₂."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import Count, UnstructuredMethod, register_method
from prunelab.methods.calibration import InputObserver, input_observer
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
    classifier). Beyond Linear/Conv: an Embedding's input is one-hot, so row j is weighed by
    √(frequency of token j); an attention's in-projection rows by the query, key or value input
    they read; an RNN's first-layer input weights by the input sequence. Tensors whose input is
    internal (an RNN's recurrent weights, deeper RNN layers) or shared by two modules are refused
    with the exclusion to use. Inputs are captured with forward hooks in eval mode. Labels are
    not needed.
    """

    needs_data = True
    batches: Count | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        observers = [input_observer(w, self.name) for w in weights]  # refuse before any work
        sums: dict[int, torch.Tensor] = {}
        rows: dict[int, torch.Tensor | int] = {}

        def recorder(index: int, observer: InputObserver):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                value, count = observer.collect(args, kwargs)
                sums[index] = sums[index] + value if index in sums else value
                rows[index] = rows[index] + count if index in rows else count

            return hook

        handles = [w.module.register_forward_pre_hook(recorder(i, o), with_kwargs=True)
                   for i, (w, o) in enumerate(zip(weights, observers, strict=True))]
        try:
            with eval_mode(model), torch.no_grad():
                for x, _ in iter_batches(data, model, self.batches):
                    model(x)
        finally:
            for handle in handles:
                handle.remove()
        scores = []
        for i, (w, observer) in enumerate(zip(weights, observers, strict=True)):
            if i not in sums:  # a layer the forward never reached gets no activation credit
                scores.append(torch.zeros_like(w.weight, dtype=torch.float32))
                continue
            norm = observer.spread((sums[i] / rows[i]).sqrt())
            scores.append(w.weight.detach().float().abs() * norm)
        return scores
