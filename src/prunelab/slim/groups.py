"""The channel groups a slimmable network switches (and ``widen`` resizes), and which layers
can take part in them.

Both :func:`~prunelab.slim.convert` and :func:`~prunelab.slim.widen` work on torch-pruning's
dependency groups with the network's outputs and the excluded layers held fixed; a group's
channels are split into *segments* by which layers produce them (the branches of a
concatenation), each of which switches or grows on its own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.slim.layers import NORM_TYPES
from prunelab.sparsity.masks import check_layer_patterns
from prunelab.structured.graph import ROOT_TYPES, ChannelGroup, Graph, output_layers


class SlimmingError(PrunelabError):
    """A model (or one of its layers) whose channels cannot be switched."""


def channel_groups(net: nn.Module, example: torch.Tensor,
                   exclude: str | Sequence[str] = ()) -> list[ChannelGroup]:
    """The channel groups of ``net``, with its output layers and the layers matching the
    ``exclude`` name patterns kept at their size (a pattern that matches nothing is refused)."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    modules = dict(net.named_modules())
    roots = [n for n, m in modules.items() if isinstance(m, ROOT_TYPES)]
    check_layer_patterns(roots, {"exclude": patterns})
    excluded = [modules[n] for n in roots if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return Graph(net, example, [*output_layers(net, example), *excluded]).groups()


def segments(group: ChannelGroup) -> list[torch.Tensor]:
    """The group's channels split by which (non-depthwise) layers produce them."""
    producers = [m for m in group.producers if not is_depthwise(m.module)]
    signature: dict[int, tuple[int, ...]] = {p: () for p in range(group.size)}
    for i, member in enumerate(producers):
        for position in member.positions:
            signature[position] += (i,)
    found: dict[tuple[int, ...], list[int]] = {}
    for position in range(group.size):
        found.setdefault(signature[position], []).append(position)
    return [torch.tensor(s) for s in found.values()]


def check_switchable(name: str, module: nn.Module) -> None:
    """Refuse, naming the layer and the fix, a group member whose channels cannot switch."""
    if isinstance(module, (*NORM_TYPES, nn.Linear)):
        return
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise SlimmingError(f"layer {name!r} ({type(module).__name__}) cannot switch width: "
                            "transposed convolutions are not supported; exclude=[...] it")
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and not is_depthwise(module):
            raise SlimmingError(
                f"layer {name!r} is a grouped convolution ({module.groups} groups) and cannot "
                "switch width (only depthwise ones can); exclude=[...] it")
        return
    raise SlimmingError(
        f"layer {name!r} ({type(module).__name__}) shares channels with convolutions but "
        "cannot switch width (only Conv/Linear/BatchNorm can); exclude=[...] the layers "
        "that feed it")


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def is_out_side(member_side: str, module: nn.Module) -> bool:
    """Whether a group member switches its output side (producers, BatchNorms and depthwise
    convolutions, whose input and output channels are the same) rather than its input side."""
    return member_side == "out" or isinstance(module, NORM_TYPES) or is_depthwise(module)
