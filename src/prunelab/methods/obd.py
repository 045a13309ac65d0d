"""Optimal Brain Damage (LeCun et al. 1990): saliency ½·h_ii·w² from a diagonal Hessian."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from prunelab.errors import InvalidValueError
from prunelab.methods.base import Count, UnstructuredMethod, register_method
from prunelab.sparsity import PrunableWeight
from prunelab.utils import eval_mode, iter_batches

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over a batch's predictions (classes last: classifier or LM)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@register_method("obd")
@dataclass
class OptimalBrainDamage(UnstructuredMethod):
    """OBD: score ½·h_ii·w², h_ii the loss's diagonal Hessian (LeCun et al. 1990).

    The second-order Taylor estimate of the loss increase when a weight is set to zero, at a
    trained minimum where the gradient term vanishes and off-diagonal terms are neglected.
    ``hessian="fisher"`` (default) uses the empirical Fisher: h_ii = mean over calibration
    samples of (∂ℓ_n/∂w_i)², per-sample gradients computed with ``torch.func.vmap`` in chunks of
    ``chunk`` samples. ``hessian="hutchinson"`` estimates the true diagonal as the mean of
    z ⊙ Hz over ``probes`` Rademacher vectors z per batch (Hessian-vector products by double
    backward; seeded by ``seed``); its estimates can be negative, so |h_ii| is used. The loss is
    the mean cross-entropy over each sample's predictions (a classifier's or a language model's
    tokens), or ``loss(outputs, labels)``. Weights are not updated. Needs labelled batches; runs
    in eval mode and leaves ``.grad`` and BatchNorm statistics untouched.
    """

    needs_data = True
    hessian: Literal["fisher", "hutchinson"] = "fisher"
    batches: Count | None = None
    probes: Count = 8
    chunk: Count = 32
    seed: int = 0
    loss: Loss | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        names = {id(p): name for name, p in model.named_parameters()}
        missing = [w.name for w in weights if id(w.original) not in names]
        if missing:
            raise InvalidValueError(f"obd needs trainable parameters; {missing[0]!r} is not one")
        targets = [names[id(w.original)] for w in weights]
        estimate = self._fisher if self.hessian == "fisher" else self._hutchinson
        with eval_mode(model):
            diagonal = estimate(model, targets, data)
        return [0.5 * h * w.weight.detach().float().pow(2)
                for w, h in zip(weights, diagonal, strict=True)]

    def _labelled(self, model: nn.Module, data: Iterable):
        for x, y in iter_batches(data, model, self.batches):
            if y is None:
                raise InvalidValueError("obd needs labelled calibration batches (x, y)")
            yield x, y

    def _fisher(self, model: nn.Module, targets: list[str], data: Iterable) -> list[torch.Tensor]:
        """Mean over samples of the squared per-sample gradient."""
        loss_fn = self.loss or mean_cross_entropy
        params = {name: p.detach() for name, p in model.named_parameters()}
        chosen = {name: params[name] for name in targets}

        def sample_loss(own: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {**params, **own}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=self.chunk)
        sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in chosen.items()}
        samples = 0
        for x, y in self._labelled(model, data):
            grads = per_sample(chosen, x, y)
            for name in targets:
                sums[name] += grads[name].float().pow(2).sum(0)
            samples += len(x)
        return [sums[name] / samples for name in targets]

    def _hutchinson(self, model: nn.Module, targets: list[str],
                    data: Iterable) -> list[torch.Tensor]:
        """Mean of z ⊙ Hz over Rademacher probes z (H of the mean loss over all samples)."""
        loss_fn = self.loss or mean_cross_entropy
        params = dict(model.named_parameters())
        tensors = [params[name] for name in targets]
        generator = torch.Generator().manual_seed(self.seed)
        sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        batches = list(self._labelled(model, data))
        total = sum(len(x) for x, _ in batches)
        with torch.enable_grad():
            for x, y in batches:
                grads = torch.autograd.grad(loss_fn(model(x), y), tensors, create_graph=True)
                for probe in range(self.probes):
                    zs = [(torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t)
                          for t in tensors]
                    products = torch.autograd.grad(grads, tensors, grad_outputs=zs,
                                                   retain_graph=probe < self.probes - 1)
                    for s, z, hz in zip(sums, zs, products, strict=True):
                        s += (z * hz).float() * len(x) / (total * self.probes)
        return [s.abs() for s in sums]
