"""GraSP (Wang et al. 2020): keep the weights that preserve gradient flow at initialisation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.methods.base import Count, Positive, UnstructuredMethod, register_method
from prunelab.methods.gradients import accumulate, labelled_batches, used_tensors
from prunelab.sparsity import PrunableWeight
from prunelab.utils import batch_statistics, eval_mode


@register_method("grasp")
@dataclass
class GraSP(UnstructuredMethod):
    """GraSP (Wang et al. 2020): score S = −w ⊙ (H g); remove the weights with the *highest* S.

    Removing a weight changes the gradient norm gᵀg by about −2 w·(Hg) to first order; GraSP
    keeps the weights whose removal would reduce gradient flow most. g is the loss gradient over
    the calibration batches (``batches``; ``None``: all given), H g a Hessian-vector product
    taken by double backward (∂(gᵀ·∂L/∂w)/∂w with g held fixed), both with the logits divided
    by ``temperature`` (200 in the paper's code). BatchNorm normalises with each batch's own
    statistics, as in the paper's code, which scores the network in training mode
    (``batchnorm="running"``: with the running statistics, i.e. eval mode; an untrained
    network's are 0 and 1, so nothing is normalised); the running statistics are left as they
    were either way. Meant for an untrained network (``schedule: at-init``); needs labelled
    batches. Not copied from the paper's code: its scoring copy redraws the Linear layers
    (Xavier normal) before scoring, and it draws a class-balanced calibration set.
    """

    needs_data = True
    batches: Count | None = None
    temperature: Positive = 200.0
    batchnorm: Literal["batch", "running"] = "batch"

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        mode = batch_statistics if self.batchnorm == "batch" else eval_mode
        grads = [torch.zeros_like(w.weight, dtype=torch.float32) for w in weights]
        hg = [torch.zeros_like(g) for g in grads]
        samples = 0

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x) / self.temperature, y, reduction="sum")

        with mode(model), torch.enable_grad():
            for x, y in labelled_batches(data, model, self.batches, "grasp"):
                with used_tensors(weights) as (tensors, owners):
                    accumulate(grads, owners, torch.autograd.grad(loss(x, y), tensors,
                                                                  allow_unused=True))
                samples += len(y)
            g = [t / samples for t in grads]
            for x, y in labelled_batches(data, model, self.batches, "grasp"):
                with used_tensors(weights) as (tensors, owners):
                    found = torch.autograd.grad(loss(x, y), tensors, create_graph=True,
                                                allow_unused=True)
                    dot = sum((f * g[i].to(f.dtype)).sum()
                              for i, f in zip(owners, found, strict=True) if f is not None)
                    accumulate(hg, owners, torch.autograd.grad(dot, tensors, allow_unused=True))
        # Higher means more important: the negative of GraSP's removal score.
        return [w.weight.detach().float() * h / samples
                for w, h in zip(weights, hg, strict=True)]
