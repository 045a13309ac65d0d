"""AutoSlim as a channel-pruning method: per-layer widths searched on a slimmable supernet."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.checkpoint import load_state_dict
from prunelab.errors import InvalidValueError
from prunelab.methods.base import (
    ALL_LAYERS,
    Count,
    Fraction,
    LayerSelection,
    Positive,
    Sandwich,
    register_method,
)
from prunelab.structured import StructuredMethod
from prunelab.structured.graph import apply_plan, as_example, structure_of
from prunelab.structured.method import original_size
from prunelab.utils import iter_batches


@register_method("autoslim")
@dataclass
class AutoSlimPruning(StructuredMethod):
    """AutoSlim (Yu & Huang 2019): greedy channel counts on a US-Net, under a MACs or latency
    budget.

    The model becomes a US-Net (widths ``min_width`` to 1, shared weights), trained as one for
    ``supernet_epochs`` passes over ``data`` (the sandwich rule with ``sandwich`` widths per
    step and inplace distillation, SGD at ``lr``), except the last ``search_batches`` batches,
    which are held out: each round shrinks the channel group (by ``step`` of its channels) whose
    shrinking costs the least accuracy on them, until the MACs meet the ``speedup`` target (or
    the latency predicted from layers timed on ``backend`` meets a ``latency_speedup``).
    The found channels are then removed from the model, which takes the supernet's weights for
    them (BatchNorm calibrated on the training batches); a scratch recovery trains the found
    architecture from scratch as the paper does. Only a speedup or latency target is accepted;
    with the sweep's few calibration batches this is a small-budget version of the paper's long
    supernet training (raise ``calibration_batches``). See docs/slimmable.md.
    """

    needs_data: ClassVar[bool] = True
    targets: ClassVar[tuple[str, ...]] = ("speedup", "latency")  # a MACs or latency budget
    decides: ClassVar[str] = ("a greedy search on a slimmable supernet it trains: the channel "
                              "group whose shrinking costs the least held-out accuracy goes "
                              "first")
    round_to: Count | None = 1  # the supernet's widths: give a multiple to search on multiples
    min_width: Fraction = 0.25
    supernet_epochs: Count = 1
    sandwich: Sandwich = 4
    lr: Positive = 0.01
    step: Fraction = 0.1
    search_batches: Count = 2

    def check_experiment(self, calibration_batches: int) -> None:
        if calibration_batches <= self.search_batches:
            raise InvalidValueError(
                f"autoslim holds out search_batches={self.search_batches} of the "
                f"{calibration_batches} calibration batches and trains its supernet on the rest: "
                "raise calibration_batches above search_batches")

    def prune(self, model: nn.Module, sparsity: float, *, scope: str = "global",
              data: Iterable | None = None, selection: LayerSelection = ALL_LAYERS,
              target: str = "sparsity", example_input: torch.Tensor | None = None,
              backend: str = "torch", precision: str = "fp32") -> nn.Module:
        from prunelab import slim
        from prunelab.slim.autoslim import latency_cost
        from prunelab.training import TrainRecipe

        self.check_request(target, sparsity, scope)
        if data is None:
            raise InvalidValueError("autoslim needs data: pass data=<iterable of batches>")
        batches = [(x, y) for x, y in iter_batches(data, model)]
        if any(y is None for _, y in batches) or len(batches) <= self.search_batches:
            raise InvalidValueError(
                f"autoslim needs more than search_batches={self.search_batches} labelled "
                f"batches (got {len(batches)}): training batches plus held-out search batches")
        train, held_out = batches[:-self.search_batches], batches[-self.search_batches:]
        example = as_example(model, example_input, data)
        net = slim.convert(model, width_range=(self.min_width, 1.0), round_to=self.round_to,
                           example_input=example, exclude=selection.exclude)
        recipe = TrainRecipe(epochs=self.supernet_epochs, batch_size=len(train[0][1]),
                             lr=self.lr, weight_decay=1e-4, schedule="cosine",
                             channels_last=False)
        slim.train(net, train, recipe, sandwich=self.sandwich, quiet=True)
        budget = {"speedup": sparsity} if target == "speedup" else {
            "latency_speedup": sparsity, "example_input": example, "backend": backend,
            "precision": precision}
        found = slim.autoslim(net, held_out, step=self.step, **budget)
        slim.calibrate_bn(net, found, train)
        small = slim.export(net.eval(), found)
        spec = slim.spec_of(net)
        masks = spec.masks(found)
        plan = {g.root: (~mask).nonzero().flatten().tolist()
                for g, mask in zip(spec.groups, masks, strict=True) if not bool(mask.all())}
        steps, reference = len(structure_of(model)), original_size(model, example)
        apply_plan(model, plan, example)
        load_state_dict(model, small.state_dict())
        predicted = None
        if target == "latency":  # the table the search used, read back from its cache
            cost = latency_cost(net, example, backend, precision)
            full, now = cost(spec.max_width), cost(found)
            predicted = {"backend": backend, "precision": precision,
                         "batch_size": int(example.shape[0]),
                         "predicted_ms_original": round(full, 4), "predicted_ms": round(now, 4),
                         "predicted_speedup": round(full / now, 4)}
        self._record(model, steps, reference, self.round_to or 1, predicted)
        return model
