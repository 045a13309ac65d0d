"""Widening a network: every channel group ``factor`` times as many channels.

AutoSlim searches a supernet *wider* than the model it starts from (the paper's 1.5x MobileNetV2):
the search may then keep more channels in a layer than the 1.0x model has. Zoo models take a width
argument; :func:`widen` gives any convertible model (a torchvision net, say) the same: the channel
groups that :func:`prunelab.slim.convert` switches (torch-pruning's dependency groups) grow by
``factor``, coupled layers together, and the network's input and the classifier's outputs stay.
Resized layers are re-initialised with their own ``reset_parameters`` (a wider model is trained
from scratch); layers whose shape does not change keep their weights.

The widening is recorded in the model's structure history, like a removal, so checkpoints of the
widened model, of supernets converted from it and of their exports rebuild it from the zoo.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence

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
from prunelab.slim.layers import NORM_TYPES
from prunelab.slim.supernet import is_slimmable
from prunelab.structured.graph import as_example, record_step
from prunelab.utils import eval_mode


def widen(model: nn.Module, factor: float, *, round_to: int = 1,
          example_input: torch.Tensor | None = None, exclude: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` with every channel group ``factor`` times as wide.

    Args:
        factor: at least 1; each group (each concatenated branch of a group separately) gets
            ``factor * size`` channels, rounded (halves up) to a multiple of ``round_to``.
        round_to: channel multiple of the widened groups (8 or 16 suit CPU kernels).
        example_input: one input to trace (zoo models know their input shape).
        exclude: layer-name patterns whose channel groups keep their size.

    ``widen(models.create("resnet20"), 1.5)`` has exactly the shapes of
    ``models.create("resnet20", width=1.5)``. Convert the result for a wider supernet:
    ``slim.convert(widen(model, 1.5), width_range=(0.35 / 1.5, 1.0))``.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            math.isfinite(factor) and factor >= 1):
        raise InvalidValueError(
            f"widen takes a factor >= 1, got {factor!r} (to make a model narrower, prune it or "
            "export a slimmable network at a width)")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InvalidValueError(f"round_to must be a positive integer, got {round_to!r}")
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"widen takes a torch.nn.Module, got {type(model).__name__}")
    if is_slimmable(model):
        raise InvalidValueError("widen the model before converting it to a slimmable network")
    _check_fits_in_memory(model, factor)
    net = copy.deepcopy(model)
    example = as_example(net, example_input)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)

    def wider(segments: list[torch.Tensor]) -> list[int]:
        return [max(round_to, round_to * math.floor(factor * len(s) / round_to + 0.5))
                for s in segments]

    resize_groups(net, wider, example, patterns, {"factor": float(factor), "round_to": round_to})
    return net


def _check_fits_in_memory(model: nn.Module, factor: float) -> None:
    """Refuse a factor whose widened weights could not fit in this machine's memory (a layer
    between two widened groups grows by factor², so that is the estimate), instead of letting
    the allocation take the machine down."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no estimate to compare
        return
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = params * factor * factor  # a float product: inf when huge (** would raise)
    if needed > memory:
        raise InvalidValueError(
            f"widen by {factor:g} would make the model's {params / 2**20:.1f} MiB of parameters "
            f"up to {needed / 2**30:.3g} GiB, more than this machine's {memory / 2**30:.0f} GiB "
            "of memory: use a smaller factor (1.5 or 2 are usual)")


def resize_groups(model: nn.Module,
                  sizes: Mapping[str, Sequence[int]] | Callable[[list[torch.Tensor]], list[int]],
                  example: torch.Tensor, exclude: Sequence[str] = (),
                  extra: dict | None = None) -> nn.Module:
    """Give channel groups new segment sizes, in place, and record the step (with ``extra``) in
    the structure history.

    ``sizes[root]`` lists the new size of each segment of the group rooted at ``root`` (one per
    concatenated branch; a plain group has one); or ``sizes`` is a function of a group's
    segments that every group is resized by. Groups of layers matching the ``exclude`` name
    patterns keep their size.
    """
    modules = dict(model.named_modules())
    deltas: dict[tuple[str, bool], dict[int, int]] = {}
    used: dict[str, list[int]] = {}
    for number, group in enumerate(channel_groups(model, example, exclude)):
        parts = segments(group)
        if callable(sizes):
            new = sizes(parts)
        elif group.root in sizes:
            new = list(sizes[group.root])
        else:
            continue
        used[group.root] = new
        if len(new) != len(parts) or any(
                n < len(s) for n, s in zip(new, parts, strict=True)):
            raise SlimmingError(
                f"the channel group of layer {group.root!r} has segments of "
                f"{[len(s) for s in parts]} channels; cannot resize them to {new}")
        for member in group.members:
            check_switchable(member.name, member.module)
            out = is_out_side(member.side, member.module)
            positions = torch.tensor(member.positions, dtype=torch.long)
            delta = 0
            for segment, size in zip(parts, new, strict=True):
                covered = int(torch.isin(positions, segment).sum())
                if covered % len(segment):
                    raise SlimmingError(
                        f"layer {member.name!r} uses part of the channels of layer "
                        f"{group.root!r}, so it cannot be widened with them; "
                        f"exclude=[{group.root!r}]")
                delta += covered // len(segment) * (size - len(segment))
            deltas.setdefault((member.name, out), {})[number] = delta
    missing = [] if callable(sizes) else sorted(set(sizes) - set(used))
    if missing:
        raise SlimmingError(f"no channel group is rooted at {missing[:3]} in this model")
    for (name, out), by_group in deltas.items():
        if sum(by_group.values()):
            _resize(modules[name], sum(by_group.values()), out)
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    except PrunelabError:
        raise
    except Exception as exc:
        raise SlimmingError(
            f"the widened network does not run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}): something in its forward fixes a channel "
            "count; exclude=[...] the layers around it") from None
    record_step(model, {"widen": {root: list(map(int, s)) for root, s in used.items()},
                        "exclude": list(exclude), "input_shape": list(example.shape[1:]),
                        **(extra or {})})
    return model


def _resize(module: nn.Module, delta: int, out: bool) -> None:
    """Grow one side of a Conv/Linear/BatchNorm by ``delta`` channels, then re-initialise it."""
    like = next(module.parameters(), None)
    kwargs = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if isinstance(module, NORM_TYPES):
        module.num_features += delta
        n = module.num_features
        if module.affine:
            module.weight = nn.Parameter(torch.empty(n, **kwargs))
            module.bias = nn.Parameter(torch.empty(n, **kwargs))
        if module.track_running_stats:
            module.running_mean = torch.zeros(n, **kwargs)
            module.running_var = torch.ones(n, **kwargs)
        module.reset_parameters()
        return
    if isinstance(module, nn.Linear):
        if out:
            module.out_features += delta
        else:
            module.in_features += delta
        shape: tuple[int, ...] = (module.out_features, module.in_features)
        rows = module.out_features
    else:  # a Conv (grouped ones other than depthwise were refused)
        if is_depthwise(module):
            module.out_channels = module.in_channels = module.groups = module.out_channels + delta
        elif out:
            module.out_channels += delta
        else:
            module.in_channels += delta
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        rows = module.out_channels
    module.weight = nn.Parameter(torch.empty(shape, **kwargs))
    if module.bias is not None:
        module.bias = nn.Parameter(torch.empty(rows, **kwargs))
    module.reset_parameters()
