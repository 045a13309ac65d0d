"""Network Slimming (Liu et al. 2017) and Sparse Structure Selection (Huang & Wang 2018).

Both learn which channels matter through per-channel scaling factors, here the BatchNorm scales
γ, made sparse during training: Slimming with an L1 penalty (its subgradient), SSS with the
proximal operator of the L1 norm inside an accelerated proximal gradient step, which drives
factors to exactly zero. The factors are comparable across layers, so one global threshold
picks the channels to remove: the architecture is found automatically.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.methods.base import Momentum, NonNegative, register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.scores import per_channel_sum
from prunelab.training import Callback, TrainState


def _scales(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules()
            if isinstance(m, _BatchNorm) and isinstance(m.weight, nn.Parameter)]


class BNScaleL1(Callback):
    """Adds ``strength · sign(γ)`` to every BatchNorm scale's gradient: the subgradient of the
    penalty ``strength · Σ|γ|`` (Network Slimming's sparsity training)."""

    def __init__(self, strength: float):
        self.strength = strength

    def on_after_backward(self, state: TrainState) -> None:
        for gamma in _scales(state.model):
            if gamma.grad is not None:
                gamma.grad.add_(self.strength * torch.sign(gamma.detach()))


class BNScaleAPG(Callback):
    """Accelerated proximal gradient on BatchNorm scales (Sparse Structure Selection).

    Each step: ``z = γ − η∇``; ``s = soft_threshold(z, η·strength)``; ``v = s − γ + μ·v``;
    ``γ = s + μ·v``. The scales leave the main optimiser (their gradient is cleared), so weight
    decay and its momentum do not touch them; the soft threshold makes exact zeros.
    """

    def __init__(self, strength: float, momentum: float = 0.9):
        self.strength, self.momentum = strength, momentum
        self.velocity: dict[int, torch.Tensor] = {}

    def on_after_backward(self, state: TrainState) -> None:
        lr = state.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for gamma in _scales(state.model):
                if gamma.grad is None:
                    continue
                z = gamma - lr * gamma.grad
                shrunk = torch.sign(z) * (z.abs() - lr * self.strength).clamp_min(0)
                velocity = self.velocity.get(id(gamma), torch.zeros_like(gamma))
                velocity = shrunk - gamma + self.momentum * velocity
                self.velocity[id(gamma)] = velocity
                gamma.copy_(shrunk + self.momentum * velocity)
                gamma.grad = None


def _has_scales(group: ChannelGroup) -> bool:
    return any(m.side == "out" and m.module.weight is not None for m in group.norms)


NO_SCALES = ("it ranks channels by the scale of the BatchNorm after them, and these have none "
             "(use l1-filter or l2-channel for a model without BatchNorm)")


def _bn_scale_scores(groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Sum of |γ| over each group's BatchNorms."""
    return [
        per_channel_sum(g, [m for m in g.norms if m.side == "out" and m.module.weight is not None],
                        lambda member: member.module.weight.abs())
        for g in groups
    ]


@register_method("slimming")
@dataclass
class NetworkSlimming(StructuredMethod):
    """Network Slimming (Liu et al. 2017): prune channels with the smallest BatchNorm scales |γ|.

    Train with the L1 penalty ``l1 · Σ|γ|`` (the paper: 1e-4 for VGG, 1e-5 for ResNet/DenseNet;
    ``training_callbacks`` gives the callback, and the benchmark runner trains with it), then
    remove the channels under one global |γ| threshold and fine-tune. Channels without a
    BatchNorm stay (a model without any is refused).
    """

    comparable_across_layers = True
    rejects = NO_SCALES
    l1: NonNegative = 1e-4

    def accepts(self, group: ChannelGroup) -> bool:
        return _has_scales(group)

    def training_callbacks(self) -> list[Callback]:
        return [BNScaleL1(self.l1)]

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        return _bn_scale_scores(groups)


@register_method("sss")
@dataclass
class SparseStructureSelection(StructuredMethod):
    """Sparse Structure Selection (Huang & Wang 2018), channel level: scaling factors trained
    sparse with accelerated proximal gradient, then the zero (smallest) factors removed.

    The BatchNorm scales serve as the channels' scaling factors; ``strength`` is the sparsity
    regularisation γ of the paper. Train with ``training_callbacks`` (the runner does), prune
    with one global threshold, fine-tune.
    """

    comparable_across_layers = True
    rejects = NO_SCALES
    strength: NonNegative = 1e-4
    momentum: Momentum = 0.9

    def accepts(self, group: ChannelGroup) -> bool:
        return _has_scales(group)

    def training_callbacks(self) -> list[Callback]:
        return [BNScaleAPG(self.strength, self.momentum)]

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        return _bn_scale_scores(groups)
