"""Neuron variance pruning and correlated-neuron merging: data-driven removal, no retraining.

On calibration data, the activations a neuron (or channel) hands to the next Linear layer are
measured. A neuron whose activation is nearly constant contributes a constant: it is removed and
``W[:, j]·mean_j`` is folded into the next layer's bias. A neuron whose activation is nearly an
affine function of a surviving neuron's, ``a_j ≈ β·a_k + c``, is merged: the survivor's outgoing
weights absorb the removed neuron's, ``W[:, k] += β·W[:, j]``, and ``W[:, j]·c`` goes into the
bias (β is the least-squares regression coefficient cov(a_j, a_k)/var(a_k)). Both are exact when
the relation is exact (a constant neuron, a duplicated one). Each neuron scores the residual of
its best such fit, ``std_j·sqrt(1 − max_k ρ²_jk)``, times the norm of its outgoing weights (the
error its removal leaves in the next layer's pre-activation); the lowest go. The model becomes
physically smaller, like the other structured methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import Count, register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.scores import capture
from prunelab.utils import iter_batches

EPS = 1e-12


@dataclass
class Moments:
    """Running first and second moments of a (samples, channels) activation stream."""

    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.count += len(x)
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.outer = x.T @ x if self.outer is None else self.outer + x.T @ x

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


def best_fits(mean: torch.Tensor, cov: torch.Tensor, candidates: list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each neuron j, its best single affine predictor among ``candidates`` (all others by
    default): ``(k, β, c, residual variance)`` with ``a_j ≈ β·a_k + c``; k = -1 means the
    constant ``mean_j`` is best (no candidate varies)."""
    n = len(mean)
    var = cov.diagonal().clamp_min(0)
    usable = var > EPS
    allowed = torch.zeros(n, dtype=torch.bool)
    allowed[candidates if candidates is not None else slice(None)] = True
    rho2 = cov.pow(2) / (var[:, None] * var[None, :]).clamp_min(EPS)
    rho2 = rho2.masked_fill(~(usable[None, :] & allowed[None, :]), -1.0)
    rho2.fill_diagonal_(-1.0)
    best_rho2, k = rho2.max(1)
    has_fit = (best_rho2 > 0) & usable
    k = torch.where(has_fit, k, torch.full_like(k, -1))
    beta = torch.where(has_fit, cov[torch.arange(n), k.clamp_min(0)] / var[k.clamp_min(0)]
                       .clamp_min(EPS), torch.zeros_like(mean))
    c = mean - beta * mean[k.clamp_min(0)]
    residual = var * (1 - best_rho2.clamp(0, 1))
    return k, beta, c, residual


def removal_order(mean: torch.Tensor, cov: torch.Tensor, outgoing: torch.Tensor
                  ) -> tuple[list[int], torch.Tensor]:
    """Greedy order of removal: each time, the neuron whose best fit among the neurons still
    there leaves the least error ``sqrt(residual)·‖outgoing‖``; returns the order and the errors
    (so of two duplicates only the first goes at no cost)."""
    remaining = list(range(len(mean)))
    order, errors = [], []
    while len(remaining) > 1:
        _, _, _, residual = best_fits(mean, cov, remaining)
        error = residual.sqrt() * outgoing
        pick = min(remaining, key=lambda j: float(error[j]))
        order.append(pick)
        errors.append(float(error[pick]))
        remaining.remove(pick)
    order += remaining
    errors.append(float("inf"))
    return order, torch.tensor(errors, dtype=torch.float64)


def order_scores(order: list[int], errors: torch.Tensor) -> torch.Tensor:
    """Scores that rank neurons in ``order`` (strictly increasing), valued by the running
    maximum of the removal errors so that layers can be compared."""
    errors = errors.clone()
    errors[-1] = errors[:-1].max() if len(errors) > 1 else 0.0  # the last one never goes
    values = torch.cummax(errors, 0).values
    step = (float(values.max()) + 1e-12) * 1e-3 / len(order)
    scores = torch.empty(len(order), dtype=torch.float64)
    scores[torch.tensor(order)] = values + step * torch.arange(1, len(order) + 1)
    return scores.float()


@register_method("merge")
@dataclass
class NeuronMerging(StructuredMethod):
    """Neuron variance pruning and correlated-neuron merging (data-driven, no retraining): remove
    the neurons/channels best explained by a constant or by another surviving neuron, folding
    the constant into the next layer's bias and the removed neuron's outgoing weights, scaled by
    the regression coefficient, into the survivor's.

    Needs calibration data and a group read by one Linear layer with a bias (an MLP's hidden
    layers; channels read by convolutions are left alone, since zero padding would make a
    constant channel's contribution position-dependent). ``compensate=False`` removes the same
    neurons without folding anything (the control).
    """

    decides: ClassVar[str] = ("calibration statistics: a neuron explained by a constant or by "
                              "a surviving neuron goes, folded into the next layer (weights "
                              "rewritten)")

    needs_data = True
    round_to: Count | None = 1  # a neuron goes when it is redundant, not to fill a vector
    compensate: bool = True
    calibration_batches: Count = 20
    _moments: dict[str, Moments] = field(default_factory=dict, init=False, repr=False)
    _orders: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    def accepts(self, group: ChannelGroup) -> bool:
        readers = group.readers
        return (not group.coupled and len(readers) == 1
                and isinstance(readers[0].module, nn.Linear) and readers[0].aligned
                and readers[0].module.bias is not None)

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        readers = {g.root: g.readers[0].module for g in groups}
        self._moments = {root: Moments() for root in readers}
        was_training = model.training
        model.eval()
        with torch.no_grad(), capture(readers, lambda root, x: self._moments[root].add(x),
                                      inputs=True):
            for x, _ in iter_batches(data, model, limit=self.calibration_batches):
                model(x)
        model.train(was_training)
        for group in groups:
            seen = self._moments[group.root].count
            if seen < 2:
                raise InvalidValueError(
                    f"merge saw {seen} calibration sample for {group.root!r}: it needs at least "
                    "2 (and more than the layer's neurons) to estimate their covariance")
            if seen <= group.size:
                warnings.warn(
                    f"merge saw {seen} calibration samples for the {group.size} neurons of "
                    f"{group.root!r}: their covariance, which says what is redundant, is rank-"
                    "deficient, so the choice is unreliable; pass more samples than neurons "
                    "(more data or calibration_batches)", stacklevel=2)
        scores = []
        self._orders = {}
        for group in groups:
            outgoing = readers[group.root].weight.detach().double().norm(dim=0).cpu()
            order, errors = removal_order(*self._moments[group.root].mean_cov(), outgoing)
            self._orders[group.root] = order
            scores.append(order_scores(order, errors))
        return scores

    def reconstruct(self, model: nn.Module, groups: list[ChannelGroup],
                    plan: dict[str, list[int]], data: Iterable | None) -> None:
        if not self.compensate:
            return
        for group in groups:
            removed = plan.get(group.root, [])
            if not removed:
                continue
            mean, cov = self._moments[group.root].mean_cov()
            remaining = set(range(group.size))
            reader = group.readers[0].module
            with torch.no_grad():
                weight = reader.weight.double()
                bias = reader.bias.double()
                gone = set(removed)
                for j in [j for j in self._orders[group.root] if j in gone]:
                    remaining.discard(j)  # fit j on the neurons still there, as ranked
                    k, beta, c, _ = best_fits(mean, cov, sorted(remaining))
                    if k[j] >= 0:
                        weight[:, k[j]] += beta[j] * weight[:, j]
                    bias += weight[:, j] * c[j]
                    weight[:, j] = 0
                reader.weight.copy_(weight)
                reader.bias.copy_(bias)
