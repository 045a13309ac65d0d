"""Group lasso on channels/neurons: train with ``strength · Σ_g ‖w_g‖₂``, remove the weakest groups.

A group is everything a channel owns: its filter (a producing layer's output row, for every
layer coupled to it through residual additions or concatenations, from the torch-pruning
dependency graph) and the input slices of every layer that reads it. These are exactly the
weights that go when the channel is removed, so driving a group's norm to zero makes its removal
harmless. Compared with Network Slimming it needs no BatchNorm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import NonNegative, register_method
from prunelab.methods.learned import check_positive
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.graph import Graph, apply_plan, as_example, output_layers
from prunelab.training import Callback, TrainState


def _slices(member, producing: bool) -> torch.Tensor:
    """Per layer-channel squared norms: output rows of a producer, input columns of a reader."""
    weight = member.module.weight
    if not producing:
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1).pow(2).sum(1)


def group_norms(group: ChannelGroup) -> torch.Tensor:
    """‖w_g‖₂ of each channel of ``group`` (differentiable in the weights)."""
    weight = group.module.weight
    squares = torch.zeros(group.size, dtype=weight.dtype, device=weight.device)
    for members, producing in ((group.producers, True), (group.readers, False)):
        for m in members:
            values = _slices(m, producing)[m.idxs]
            squares = squares.index_add(0, torch.tensor(m.positions, device=weight.device),
                                        values)
    return squares.clamp_min(1e-24).sqrt()


def channel_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's channel groups, the classifier's outputs excluded."""
    example = as_example(model, example)
    return Graph(model, example, output_layers(model, example)).groups()


class GroupLasso(Callback):
    """Adds ``strength · Σ_g ‖w_g‖₂`` to the loss (gradient ``strength · w / ‖w_g‖₂``).

    The groups are traced once, at setup, from the model's ``input_shape`` (zoo models) or
    ``example_input``.
    """

    def __init__(self, strength: float, example_input: torch.Tensor | None = None):
        self.strength = check_positive(strength, "group lasso strength")
        self.example = example_input
        self.groups: list[ChannelGroup] = []

    def on_setup(self, model: nn.Module) -> None:
        self.groups = channel_groups(model, self.example)

    def penalty(self, state: TrainState) -> torch.Tensor:
        if not self.groups:
            self.on_setup(state.model)
        return self.strength * torch.stack([group_norms(g).sum() for g in self.groups]).sum()


def remove_below(model: nn.Module, threshold: float,
                 example_input: torch.Tensor | None = None) -> dict[str, list[int]]:
    """Physically remove every channel whose group norm is below ``threshold`` (each layer keeps
    at least one); returns the removal plan ``{layer: channels}``."""
    check_positive(threshold, "group norm threshold")
    example = as_example(model, example_input)
    plan: dict[str, list[int]] = {}
    for group in channel_groups(model, example):
        with torch.no_grad():
            norms = group_norms(group)
        small = (norms < threshold).nonzero().flatten().tolist()
        if len(small) == group.size:  # keep the strongest channel
            small.remove(int(norms.argmax()))
        if small:
            plan[group.root] = small
    apply_plan(model, plan, example, output_layers(model, example))
    return plan


@register_method("group-lasso")
@dataclass
class GroupLassoPruning(StructuredMethod):
    """Group lasso (structured sparsity): train with ``strength · Σ_g ‖w_g‖₂`` over channel
    groups (a channel's filter in every coupled layer plus its readers' input slices; the
    harness trains with ``training_callbacks``), then physically remove the channels with the
    smallest group norms, ranked globally, to the target. To remove every channel below a norm
    threshold instead, call ``prunelab.methods.group_lasso.remove_below(model, threshold)``.
    """

    comparable_across_layers = True
    strength: NonNegative = 1e-4

    def training_callbacks(self) -> list[Callback]:
        return [GroupLasso(self.strength)]

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        with torch.no_grad():
            return [group_norms(g) for g in groups]
