"""SynFlow (Tanaka et al. 2020): data-free, iterative synaptic-flow pruning."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import (
    ALL_LAYERS,
    Count,
    LayerSelection,
    UnstructuredMethod,
    register_method,
)
from prunelab.methods.gradients import used_tensors
from prunelab.sparsity import (
    PrunableWeight,
    check_sparsity,
    get_mask,
    masked_parameters,
    prunable_weights,
    set_mask,
)
from prunelab.utils import eval_mode


@register_method("synflow")
@dataclass
class SynFlow(UnstructuredMethod):
    """SynFlow (Tanaka et al. 2020): iterative synaptic-flow pruning, without data.

    The network's weights (and BatchNorm parameters and statistics) are replaced by their
    absolute values, BatchNorm runs in eval mode, and an all-ones input goes through it in
    float64 (so the product of many layers does not overflow); with R the sum of the outputs,
    each weight scores ∂R/∂w ⊙ w, the synaptic flow through it. Pruning repeats over ``rounds``
    rounds (100 in the paper) on the exponential schedule density_k = (1 − s)^(k/rounds),
    re-scoring the masked network each round, which is what avoids layer collapse. The last
    round reaches the target exactly. Data, when given, is ignored; the input shape comes from
    the model (zoo models know it) or ``input_shape`` (without the batch dimension).
    """

    rounds: Count = 100
    input_shape: tuple[int, ...] | None = None
    _flow: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nm is not None and self.rounds > 1:
            raise InvalidValueError(
                f"synflow with nm={self.nm!r} prunes to the N:M pattern at once: its rounds "
                "would need sparsities between 0 and 1 - N/M, which N:M cannot express; set "
                "rounds: 1")

    def prune(self, model: nn.Module, sparsity: float, *, scope: str = "global",
              data: Iterable | None = None, selection: LayerSelection = ALL_LAYERS,
              target: str = "sparsity", example_input: torch.Tensor | None = None) -> nn.Module:
        if target != "sparsity":
            sparsity = self._sparsity_for(model, target, sparsity, scope, data, selection,
                                          example_input)
        density = 1.0 - check_sparsity(sparsity)
        self._flow = _linearised(model)  # one copy for all rounds; masks are synced each round
        try:
            for k in range(1, self.rounds + 1):
                step = 1.0 - density ** (k / self.rounds) if k < self.rounds else sparsity
                super().prune(model, step, scope=scope, selection=selection)
        finally:
            self._flow = None
        return model

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        shape = self.input_shape or getattr(model, "input_shape", None)
        if not shape:
            raise InvalidValueError(
                f"synflow needs the input shape of {type(model).__name__} (it feeds an all-ones "
                "input): set the option input_shape, e.g. input_shape=[3, 32, 32]")
        flow = self._flow if self._flow is not None else _linearised(model)
        for name, module, param in masked_parameters(model):
            set_mask(flow.get_submodule(name), get_mask(module, param), param)
        by_name = {w.name: w for w in prunable_weights(flow)}
        copies = [by_name[w.name] for w in weights]
        device = next(flow.parameters()).device
        with eval_mode(flow), torch.enable_grad():
            ones = torch.ones(1, *shape, dtype=torch.float64, device=device)
            grads = [torch.zeros_like(w.weight) for w in copies]
            with used_tensors(copies) as (tensors, owners):
                flow_sum = flow(ones).sum()
                for i, g in zip(owners, torch.autograd.grad(flow_sum, tensors,
                                                            allow_unused=True), strict=True):
                    if g is not None:
                        grads[i] += g
        # Kept in float64: deep networks' flows overflow float32.
        return [c.weight.detach() * g for c, g in zip(copies, grads, strict=True)]


def _linearised(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with every parameter and buffer replaced by its |value|."""
    flow = copy.deepcopy(model).double()
    with torch.no_grad():
        for tensor in [*flow.parameters(), *flow.buffers()]:
            if tensor.is_floating_point():
                tensor.abs_()
    return flow
