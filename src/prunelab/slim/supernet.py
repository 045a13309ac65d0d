"""Converting a network into a slimmable supernet, and switching its width.

A width is a number of channels per *channel group* (torch-pruning's dependency groups, the same
groups the structured methods remove channels from): a group is one layer's output channels
together with everything coupled to them (the BatchNorm after it, the readers' input channels,
the other branches of a residual addition, the depthwise convolution in between). At a width a
group uses its first k channels, in every layer of the group at once, so coupled channels always
switch together. The network's input and the classifier's outputs belong to no group and never
change.

A width is given as a fraction (every group keeps ``round(w * size)`` channels, rounded to a
multiple of ``round_to``) or, for per-layer widths such as AutoSlim finds, as a dict
``{group root layer: channels}`` (groups not named stay at full width).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.slim.groups import (
    SlimmingError,
    channel_groups,
    check_switchable,
    is_depthwise,
    is_out_side,
    segments,
)
from prunelab.slim.layers import (
    NORM_TYPES,
    Index,
    SlimBatchNorm,
    SlimConv,
    SlimLayer,
    SwitchableBatchNorm,
    count,
    make_slim,
)
from prunelab.structured.graph import (
    ROOT_TYPES,
    as_example,
)
from prunelab.utils import check_input, eval_mode, input_errors

Width = float | Mapping[str, int]
SPEC_ATTR = "_prunelab_slim"


@dataclass
class Group:
    """A channel group: its root layer's name, how many channels it has, and its segments.

    A segment is the group's channels that come from the same producers, in order: the whole
    group for a plain layer or a residual addition, one segment per branch where branches are
    concatenated (a depthwise convolution after a concatenation makes the branches one group).
    At ``k`` channels each segment keeps its first share of ``k`` (at least one), so no branch
    is ever cut off entirely.
    """

    root: str
    size: int
    segments: list[torch.Tensor]

    def mask(self, k: int) -> torch.Tensor:
        """Which of the group's channels are active when it keeps ``k`` of them."""
        keep = torch.zeros(self.size, dtype=torch.bool)
        for segment in self.segments:
            n = k if len(self.segments) == 1 else max(
                1, math.floor(k * len(segment) / self.size + 0.5))
            keep[segment[:n]] = True
        return keep


@dataclass
class Side:
    """One side (output or input channels) of a layer: which group channels it carries.

    ``links`` holds ``(group number, layer channels, group positions)``: the layer's channel
    ``channels[i]`` is the group's channel ``positions[i]``.
    """

    full: int
    links: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def active(self, masks: Sequence[torch.Tensor]) -> Index:
        """The active channels when group g's active channels are ``masks[g]``."""
        if not self.links:
            return None
        keep = torch.ones(self.full, dtype=torch.bool)
        for g, channels, positions in self.links:
            keep[channels[~masks[g][positions]]] = False
        if bool(keep.all()):
            return None
        index = keep.nonzero().flatten()
        n = len(index)
        return slice(0, n) if n and int(index[-1]) == n - 1 else index


@dataclass
class SlimSpec:
    """What a converted network knows about itself (kept on it as ``_prunelab_slim``)."""

    groups: list[Group]
    outs: dict[str, Side]
    ins: dict[str, Side]
    depthwise: set[str]
    widths: list[float] | None
    width_range: tuple[float, float] | None
    round_to: int
    input_shape: tuple[int, ...]
    current: Width = 1.0
    #: Per Conv/Linear: (output positions x kernel size, out channels, in channels per group)
    #: at full width, for counting MACs at any width without running the net.
    costs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: The options ``convert`` was called with (to rebuild the supernet from a checkpoint).
    options: dict = field(default_factory=dict)
    #: Active channels per layer for recently used widths (switching is then a lookup).
    indices: dict = field(default_factory=dict, repr=False)

    def layer_indices(self, counts: tuple[int, ...]) -> dict[str, tuple[Index, Index]]:
        """``{layer: (active outputs, active inputs)}`` when group g keeps ``counts[g]``."""
        if counts not in self.indices:
            if len(self.indices) >= 64:  # a US-Net draws new widths every step
                self.indices.clear()
            masks = [g.mask(k) for g, k in zip(self.groups, counts, strict=True)]
            self.indices[counts] = {
                name: (self.outs[name].active(masks) if name in self.outs else None,
                       self.ins[name].active(masks) if name in self.ins else None)
                for name in {*self.outs, *self.ins}}
        return self.indices[counts]

    @property
    def universal(self) -> bool:
        """US-Net (any width in a range) rather than S-Net (a fixed list)."""
        return self.width_range is not None

    @property
    def max_width(self) -> float:
        return self.width_range[1] if self.universal else self.widths[-1]

    @property
    def min_width(self) -> float:
        return self.width_range[0] if self.universal else self.widths[0]

    def channels(self, width: float, size: int) -> int:
        """Channels a group of ``size`` keeps at a uniform ``width`` (nearest, ``round_to``);
        width 1 is always the whole group."""
        if size <= self.round_to or width >= 1:
            return size
        k = max(1, math.floor(width * size + 0.5))
        if self.round_to > 1:
            k = max(self.round_to, self.round_to * math.floor(k / self.round_to + 0.5))
        return min(k, size)

    def counts(self, width: Width) -> tuple[int, ...]:
        """Channels per group at ``width`` (checked against the net's widths)."""
        if isinstance(width, Mapping):
            return self._layer_counts(width)
        width = check_width(width)
        if self.universal:
            lo, hi = self.width_range
            if not lo - 1e-9 <= width <= hi + 1e-9:
                raise InvalidValueError(
                    f"width {width:g} is outside this US-Net's range [{lo:g}, {hi:g}]")
        elif self.choice(width) is None:
            raise InvalidValueError(
                f"width {width:g} is not one of this S-Net's widths "
                f"({', '.join(f'{w:g}' for w in self.widths)}); an S-Net runs only at the "
                "widths it was converted with (convert with width_range=... for any width)")
        return tuple(self.channels(width, g.size) for g in self.groups)

    def masks(self, width: Width) -> list[torch.Tensor]:
        """The active channels of every group at ``width``."""
        return [g.mask(k) for g, k in zip(self.groups, self.counts(width), strict=True)]

    def macs(self, width: Width) -> int:
        """Multiply-accumulates of one input at ``width`` (as torch's FLOP counter counts
        convolutions and linear layers, halved)."""
        masks = self.masks(width)
        total = 0
        for name, (per_channel, out, per_group) in self.costs.items():
            if name in self.outs:
                out = count(self.outs[name].active(masks), out)
            if name in self.ins and name not in self.depthwise:
                per_group = count(self.ins[name].active(masks), per_group)
            total += per_channel * out * per_group
        return total

    def layer_widths(self, width: Width) -> dict[str, tuple[int, int]]:
        """``{layer: (input channels, output channels)}`` of every Conv/Linear at ``width``
        (a depthwise convolution's inputs are its outputs); what a latency table prices."""
        masks = self.masks(width)
        widths = {}
        for name, (_, out, per_group) in self.costs.items():
            if name in self.outs:
                out = count(self.outs[name].active(masks), out)
            if name in self.depthwise:
                per_group = out
            elif name in self.ins:
                per_group = count(self.ins[name].active(masks), per_group)
            widths[name] = (per_group, out)
        return widths

    def choice(self, width: float) -> int | None:
        """The position of ``width`` in an S-Net's list (its switchable BatchNorm)."""
        for i, w in enumerate(self.widths or ()):
            if abs(w - width) < 1e-9:
                return i
        return None

    def _layer_counts(self, width: Mapping[str, int]) -> tuple[int, ...]:
        if not self.universal:
            raise InvalidValueError(
                "per-layer widths need a US-Net (convert with width_range=...): an S-Net's "
                "switchable BatchNorm only knows its fixed widths")
        by_root = {g.root: i for i, g in enumerate(self.groups)}
        counts = [g.size for g in self.groups]
        for root, k in width.items():
            if root not in by_root:
                from prunelab.errors import did_you_mean

                raise InvalidValueError(
                    f"{root!r} is not the root layer of a channel group of this net."
                    f"{did_you_mean(str(root), by_root)} Groups: {', '.join(by_root)}")
            size = self.groups[by_root[root]].size
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
                raise InvalidValueError(
                    f"group {root!r} has {size} channels: its width must be an integer from "
                    f"1 to {size}, got {k!r}")
            counts[by_root[root]] = k
        return tuple(counts)


def check_width(width: object) -> float:
    """A width must be a number in (0, 1]."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
            0 < float(width) <= 1):
        raise InvalidValueError(
            f"a width is a fraction of the channels in (0, 1], got {width!r}")
    return float(width)


def spec_of(net: nn.Module) -> SlimSpec:
    """The slimmable description of ``net``; an error if it was not converted."""
    spec = getattr(net, SPEC_ATTR, None)
    if spec is None:
        raise InvalidValueError(
            f"this {type(net).__name__} is not slimmable: convert it first with "
            "prunelab.slim.convert(model, widths=[...]) or width_range=(lo, hi)")
    return spec


def is_slimmable(net: nn.Module) -> bool:
    return getattr(net, SPEC_ATTR, None) is not None


def convert(
    model: nn.Module,
    widths: Sequence[float] | None = None,
    *,
    width_range: tuple[float, float] | None = None,
    round_to: int = 1,
    switchable_bn: bool = True,
    example_input: torch.Tensor | None = None,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """A slimmable copy of ``model``: an S-Net (``widths``) or a US-Net (``width_range``).

    Args:
        widths: S-Net: the fixed widths, fractions in (0, 1]; each gets a private BatchNorm.
        width_range: US-Net: ``(lo, hi)``, any width in between; BatchNorm affine parameters are
            shared, statistics come from :func:`prunelab.slim.calibrate_bn`.
        round_to: keep a multiple of this many channels per group (groups this small stay whole).
        switchable_bn: S-Net only; False shares one BatchNorm between widths (the naive baseline
            the paper shows failing).
        example_input: one input to trace (zoo models know their input shape).
        exclude: layer-name patterns whose channel groups stay at full width.

    The model itself is left unchanged. The copy starts at its largest width.
    """
    if (widths is None) == (width_range is None):
        raise InvalidValueError(
            "give either widths=[...] (S-Net, fixed widths) or width_range=(lo, hi) (US-Net)")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InvalidValueError(f"round_to must be a positive integer, got {round_to!r}")
    if widths is not None:
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise InvalidValueError(
                f"widths must be a non-empty list of fractions in (0, 1], got {widths!r}")
        widths = sorted({check_width(w) for w in widths})
    else:
        if not isinstance(width_range, Sequence) or len(width_range) != 2:
            raise InvalidValueError(f"width_range must be (lo, hi), got {width_range!r}")
        lo, hi = (check_width(w) for w in width_range)
        if lo > hi:
            raise InvalidValueError(f"width_range (lo, hi) needs lo <= hi, got {width_range!r}")
        width_range = (lo, hi)
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    net = copy.deepcopy(model)
    if is_slimmable(net):
        raise InvalidValueError("the model is already slimmable")
    example = as_example(net, example_input)
    check_input(net, example)
    with torch.no_grad(), eval_mode(net), input_errors(net, example):
        net(example)  # a wrong example is one clear error here, not a trace failure below
    spec = SlimSpec([], {}, {}, set(), widths, width_range, round_to, tuple(example.shape[1:]))
    for number, group in enumerate(channel_groups(net, example, exclude)):
        spec.groups.append(Group(group.root, group.size, segments(group)))
        for member in group.members:
            check_switchable(member.name, member.module)
            module = member.module
            if is_depthwise(module):
                spec.depthwise.add(member.name)
            out = is_out_side(member.side, module)
            table = spec.outs if out else spec.ins
            full = _channels(module, out)
            side = table.setdefault(member.name, Side(full))
            side.links.append((number, torch.tensor(member.idxs), torch.tensor(member.positions)))
    if not spec.groups:
        raise SlimmingError(
            f"{type(model).__name__} has no channels that can switch width (none is produced "
            "by a convolution or Linear layer and read by another one, or all are excluded): "
            "a slimmable network needs at least one hidden layer")
    spec.costs = _costs(net, example)
    spec.options = {"widths": widths, "width_range": list(width_range) if width_range else None,
                    "round_to": round_to, "switchable_bn": switchable_bn,
                    "exclude": [exclude] if isinstance(exclude, str) else list(exclude)}
    for name, module in list(net.named_modules()):  # BatchNorms are replaced on the way
        if isinstance(module, ROOT_TYPES) and (name in spec.outs or name in spec.ins):
            make_slim(module)
            module.slim_depthwise = name in spec.depthwise
        elif isinstance(module, NORM_TYPES):
            if width_range is None and switchable_bn:
                _replace(net, name, SwitchableBatchNorm(module, _norm_sizes(spec, name, module)))
            else:
                make_slim(module)
    setattr(net, SPEC_ATTR, spec)
    set_width(net, spec.max_width)
    for w in (spec.min_width, spec.max_width):
        try:
            with torch.no_grad(), width(net, w):
                net.eval()(example)
        except PrunelabError:
            raise
        except Exception as exc:
            raise SlimmingError(
                f"the network does not run at width {w:g} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}): something in its forward fixes a channel "
                "count; exclude=[...] the layers around it") from None
    net.train(model.training)
    return net


def _costs(net: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """Each Conv/Linear's MACs per (output channel x input channel of a group), from one run."""
    costs: dict[str, tuple[int, int, int]] = {}

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            out, per_group = module.out_features, module.in_features
            per_channel = output.numel() // out
        else:
            out, per_group = module.out_channels, module.in_channels // module.groups
            per_channel = output.numel() // out * module.weight[0, 0].numel()
        previous = costs.get(name, (0, out, per_group))[0]
        costs[name] = (previous + per_channel, out, per_group)

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(n, m, o))
             for n, m in net.named_modules() if isinstance(m, ROOT_TYPES)]
    try:
        with torch.no_grad():
            net.eval()(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return costs


def _channels(module: nn.Module, out: bool) -> int:
    if isinstance(module, NORM_TYPES):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return module.out_channels if out else module.in_channels


def _norm_sizes(spec: SlimSpec, name: str, module: nn.Module) -> list[tuple[int, Index]]:
    """The number of active channels of a BatchNorm at each S-Net width, with their index."""
    side = spec.outs.get(name)
    sizes = []
    for w in spec.widths:
        index = side.active(spec.masks(w)) if side is not None else None
        sizes.append((count(index, module.num_features), index))
    return sizes


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


def set_width(net: nn.Module, width: Width) -> None:
    """Run ``net`` at ``width`` from now on (a fraction, or ``{group root: channels}``)."""
    spec = spec_of(net)
    counts = spec.counts(width)
    indices = spec.layer_indices(counts)
    choice = None if spec.universal or isinstance(width, Mapping) else spec.choice(width)
    for name, module in net.named_modules():
        if isinstance(module, SlimLayer):
            module.slim_out, slim_in = indices.get(name, (None, None))
            if isinstance(module, SlimBatchNorm):
                module.slim_key = counts
                continue
            module.slim_in = slim_in
            if isinstance(module, SlimConv) and module.slim_depthwise:
                module.groups = count(module.slim_out, module.out_channels)
        elif isinstance(module, SwitchableBatchNorm):
            module.slim_choice = choice
    spec.current = dict(width) if isinstance(width, Mapping) else float(width)


def get_width(net: nn.Module) -> Width:
    """The width ``net`` runs at now."""
    return spec_of(net).current


@contextmanager
def width(net: nn.Module, w: Width) -> Iterator[nn.Module]:
    """Run ``net`` at width ``w`` inside the block; the previous width comes back after."""
    previous = spec_of(net).current
    set_width(net, w)
    try:
        yield net
    finally:
        set_width(net, previous)
