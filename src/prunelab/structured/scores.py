"""Helpers shared by channel criteria: per-channel weight norms and activation capture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunelab.structured.graph import ChannelGroup, Member


def per_channel_sum(group: ChannelGroup, members: list[Member],
                    value: Callable[[Member], torch.Tensor]) -> torch.Tensor:
    """Sum, over ``members``, of a per-channel value of each layer, placed at the group's
    channel positions (``value`` returns one number per channel of the layer)."""
    total = torch.zeros(group.size)
    for member in members:
        total[member.positions] += value(member).detach().float().cpu()[member.idxs]
    return total


def filter_norms(group: ChannelGroup, p: float) -> torch.Tensor:
    """Sum over the group's producing layers of each output filter's Lp norm."""
    def norms(member: Member) -> torch.Tensor:
        weight = member.module.weight
        return weight.reshape(weight.shape[0], -1).norm(p=p, dim=1)

    return per_channel_sum(group, group.producers, norms)


def channel_outputs(group: ChannelGroup) -> list[Member]:
    """Where the group's channels are seen as the next layers see them: its BatchNorms when
    there are any (the producing layers otherwise)."""
    norms = [m for m in group.norms if m.side == "out"]
    return norms or group.producers


@contextmanager
def capture(modules: dict[str, nn.Module], record: Callable[[str, torch.Tensor], None],
            inputs: bool = False) -> Iterator[None]:
    """Call ``record(name, tensor)`` with each module's output (or first input) while active."""
    def hook(name: str):
        if inputs:
            return lambda module, args: record(name, args[0].detach())
        return lambda module, args, output: record(name, output)

    handles = [
        (m.register_forward_pre_hook(hook(n)) if inputs else m.register_forward_hook(hook(n)))
        for n, m in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """Move the channel dimension first and flatten the rest: (C, everything else)."""
    if x.dim() == 2:
        return x.t()
    return x.transpose(0, 1).reshape(x.shape[1], -1)

