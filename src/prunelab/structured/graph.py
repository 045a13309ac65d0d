"""Channel groups and their physical removal, on torch-pruning's dependency graph.

A *channel group* is a set of channels that must be removed together: the output channels of a
convolution (or Linear), the BatchNorm after it, the input channels of every layer that reads
them, and, across a residual addition or a concatenation, the matching channels of every other
branch. torch-pruning traces the model once and finds these couplings for any architecture; this
module turns its groups into plain data (names and sizes) and applies removals by name, so a
removal plan can be applied to a copy, replayed after loading a checkpoint, and saved as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.sparsity import masked_modules
from prunelab.structured.check import (
    channels_zeroed,
    difference,
    mismatch,
    outputs,
    without,
    zeroable,
)
from prunelab.utils import iter_batches, model_device

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STRUCTURE_ATTR = "_prunelab_structure"  # removal history kept on the model, saved with it
_reshape_mapping = index_mapping.update_reshape_index_mapping


def _tolerant_reshape_mapping(graph, node) -> None:
    """torch-pruning's reshape index mapping, leaving a reshape it cannot size unmapped.

    A channel shuffle (ShuffleNet) makes it divide by a channel count it inferred as 0 and the
    whole trace fails; left unmapped, the groups through that reshape may come out wrong, and
    the removal check refuses exactly those by name.
    """
    with contextlib.suppress(ZeroDivisionError):
        _reshape_mapping(graph, node)


index_mapping.update_reshape_index_mapping = _tolerant_reshape_mapping


@dataclass
class Member:
    """One layer touched by a channel group: ``out`` channels produced or ``in`` channels read.

    ``idxs[i]`` is the layer's own channel that is the group's channel ``positions[i]``; they
    differ after a concatenation, where each branch covers part of the group.
    """

    name: str
    module: nn.Module
    side: str  # "out" or "in"
    idxs: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        """True when the layer's channels are exactly the group's, in order."""
        return self.idxs == self.positions


@dataclass
class ChannelGroup:
    """Channels that are removed together; indices are positions in the root's output."""

    root: str
    module: nn.Module
    size: int
    members: list[Member] = field(default_factory=list)

    @property
    def producers(self) -> list[Member]:
        """Layers whose output channels belong to the group (the root and coupled branches)."""
        return [m for m in self.members if m.side == "out" and isinstance(m.module, ROOT_TYPES)]

    @property
    def norms(self) -> list[Member]:
        return [m for m in self.members if isinstance(m.module, NORM_TYPES)]

    @property
    def readers(self) -> list[Member]:
        """Layers that read the group's channels (their input channels go too)."""
        return [m for m in self.members if m.side == "in" and isinstance(m.module, ROOT_TYPES)]

    @property
    def coupled(self) -> bool:
        """True when several layers produce these channels (a residual addition, say)."""
        return len(self.producers) > 1

    @property
    def conv_groups(self) -> int:
        """The number of blocks a grouped (not depthwise) convolution splits these channels
        into (1 when there is none): removals must take the same positions in every block."""
        blocks = 1
        for m in self.members:
            conv = m.module
            if isinstance(conv, nn.modules.conv._ConvNd) and 1 < conv.groups < conv.in_channels:
                blocks = math.lcm(blocks, conv.groups)
        return blocks

    @property
    def blocker(self) -> str | None:
        """Why removing these channels cannot equal zeroing them, or None.

        A LayerNorm or GroupNorm normalises the channels together (removing some changes the
        statistics of the rest); an attention layer splits them into heads.
        """
        for m in self.members:
            if not zeroable(m.module) and any(True for _ in m.module.parameters(recurse=False)):
                return (f"{type(m.module).__name__} {m.name!r} uses these channels together "
                        "(removing some is not the same as zeroing them)")
        return None


def as_example(model: nn.Module, example_input: torch.Tensor | None,
               data: Iterable | None = None) -> torch.Tensor:
    """The example input to trace: given, else one input of ``data``, else zeros of the zoo
    model's ``input_shape``."""
    if example_input is not None:
        return example_input
    if data is not None:
        return next(iter_batches(data, model, limit=1))[0][:1]
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise InvalidValueError(
            "structured pruning traces the model: pass example_input=<a batch of inputs> "
            "(or data=...)"
        )
    return zeros_input(model, shape)


def zeros_input(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """One all-zero input of ``shape``, of the model's input type (token ids for a language
    model: ``model.input_dtype``), on the model's device."""
    return torch.zeros(1, *shape, dtype=getattr(model, "input_dtype", torch.float32),
                       device=model_device(model))


#: Names of the query/key/value projections inside an attention module with ``head_dim``.
HEAD_PROJECTIONS = frozenset({"query", "key", "value", "q_proj", "k_proj", "v_proj"})


def head_block(model: nn.Module, group: ChannelGroup) -> int:
    """The attention ``head_dim`` when ``group`` is the channels of query/key/value
    projections (removed a whole head at a time, so the module keeps its ``head_dim`` and
    loses heads), else 1."""
    for member in group.producers:
        parent, _, child = member.name.rpartition(".")
        head_dim = getattr(model.get_submodule(parent), "head_dim", None)
        if child in HEAD_PROJECTIONS and isinstance(head_dim, int) and head_dim > 1:
            if group.size % head_dim:
                raise InvalidValueError(
                    f"layer {member.name!r} has {group.size} outputs, not whole heads of "
                    f"{head_dim}; exclude it (exclude=[{group.root!r}])")
            return head_dim
    return 1


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs: the classifier (protected by default).

    Found by running the model: the last Conv/Linear executed whose output feeds the result.
    """
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, ROOT_TYPES)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


class Graph:
    """torch-pruning's dependency graph of a model, with groups described by layer names."""

    def __init__(self, model: nn.Module, example: torch.Tensor,
                 ignored: Sequence[nn.Module] = ()):
        if masked_modules(model):
            raise InvalidValueError(
                "the model carries unstructured masks: call prunelab.make_permanent(model) (or "
                "remove_masks) before structured pruning"
            )
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        was_training = model.training
        model.eval()
        try:
            with warnings.catch_warnings(), torch.enable_grad():  # it traces through autograd
                warnings.simplefilter("ignore")
                self.graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example, verbose=False
                )
        except Exception as exc:
            raise PrunelabError(
                f"torch-pruning could not trace {type(model).__name__}: {type(exc).__name__}: "
                f"{exc}. Exclude the layers around unusual operations (exclude=[...])"
            ) from None
        finally:
            model.train(was_training)
        self.ignored = list(ignored)

    def groups(self) -> list[ChannelGroup]:
        """Every prunable channel group, rooted at a Conv/Linear output, in module order.

        Roots whose group torch-pruning cannot index (channels that pass a channel shuffle
        into a concatenation) are left whole and listed in ``self.untraceable``.
        """
        found = []
        for group in self._tp_groups():
            members = []
            for item in group.items:
                module = item.dep.target.module
                if module not in self.names:
                    continue  # torch-pruning's internal nodes (additions, reshapes)
                side = "out" if self.graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                members.append(Member(self.names[module], module, side,
                                      [int(i) for i in item.idxs],
                                      [int(i) for i in item.root_idxs]))
            root = group[0].dep.target.module
            size = self.graph.get_out_channels(root)
            found.append(ChannelGroup(self.names[root], root, int(size), members))
        order = {name: i for i, name in enumerate(self.names.values())}
        return sorted(found, key=lambda g: order[g.root])

    def _tp_groups(self) -> list:
        """torch-pruning's groups (as its ``get_all_groups``), one root at a time."""
        graph, visited, found = self.graph, set(), []
        ignored = set(self.ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
        self.untraceable: list[str] = []
        for module in list(graph.module2node):
            if module in ignored or module in visited or not isinstance(module, ROOT_TYPES):
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(pruner.get_out_channels(module))))
            except (IndexError, ValueError, KeyError):
                self.untraceable.append(self.names.get(module, "?"))
                continue
            producers = [item.dep.target.module for item in group.items
                         if graph.is_out_channel_pruning_fn(item.dep.handler)]
            visited.update(producers)
            if not ignored.intersection(producers):
                found.append(group)
        return found

    def _group(self, root: str, idxs: Iterable[int]):
        module = dict(self.model.named_modules())[root]
        pruner = self.graph.get_pruner_of_module(module)
        return self.graph.get_pruning_group(module, pruner.prune_out_channels, sorted(idxs))

    def remove(self, root: str, idxs: Iterable[int]) -> None:
        """Physically remove channels ``idxs`` of the group rooted at layer ``root``."""
        self._group(root, idxs).prune()

    def zeros(self, root: str, idxs: Iterable[int],
              reads: dict[nn.Module, list[int]] | None = None
              ) -> list[tuple[nn.Module, list[int]]]:
        """The output channels to zero for the masked equivalent of removing ``idxs`` (and, in
        ``reads``, the input channels each reader loses); raises when a layer of the group has
        channels that cannot be zeroed that way."""
        found = []
        for item in self._group(root, idxs).items:
            module = item.dep.target.module
            if module not in self.names:
                continue
            if not zeroable(module):
                if any(True for _ in module.parameters(recurse=False)):
                    raise _Unchecked(f"{type(module).__name__} {self.names[module]!r} uses "
                                     "these channels together")
                continue
            if self.graph.is_out_channel_pruning_fn(item.dep.handler):
                found.append((module, [int(i) for i in item.idxs]))
            elif reads is not None:
                reads.setdefault(module, []).extend(int(i) for i in item.idxs)
        return found


class _Unchecked(Exception):
    """A removal whose masked equivalent cannot be built."""


def apply_plan(model: nn.Module, plan: dict[str, list[int]], example: torch.Tensor,
               ignored: Sequence[nn.Module] = (), check: bool = True) -> nn.Module:
    """Remove the planned channels (``{root layer: indices}``) from ``model`` in place.

    With ``check`` (the default) the smaller model's output on ``example`` must equal the
    original's with the same channels zeroed; otherwise the model is restored and the layers
    whose removal is wrong are named, with the exclusion that avoids them.
    The plan is recorded on the model (with the input shape it was traced with), so the same
    architecture can be rebuilt from the original model: see :func:`replay_structure`.
    """
    plan = {root: sorted(int(i) for i in idxs) for root, idxs in plan.items() if len(idxs)}
    if not plan:
        return model
    if not check:
        graph = Graph(model, example, ignored)
        for root, idxs in plan.items():
            graph.remove(root, idxs)
    else:
        names = {m: n for n, m in model.named_modules()}
        ignored_names = [names[m] for m in ignored]
        backup = copy.deepcopy(model)
        problem, checked = _remove_checked(model, plan, example, ignored_names)
        if problem is not None:
            _restore(model, backup)
            _refuse(backup, plan, example, ignored_names, problem)
    record_step(model, {"plan": plan, "input_shape": list(example.shape[1:]),
                        **({"check": checked} if check else {})})
    return model


def record_step(model: nn.Module, step: dict) -> None:
    """Append a change of architecture (a removal, a widening) to the model's structure
    history, which :func:`replay_structure` repeats on a freshly built model."""
    history = getattr(model, STRUCTURE_ATTR, None)
    if history is None:
        history = []
        setattr(model, STRUCTURE_ATTR, history)
    history.append(step)


def _remove_checked(model: nn.Module, plan: dict[str, list[int]], example: torch.Tensor,
                    ignored: list[str]) -> tuple[str | None, dict[str, float]]:
    """Remove ``plan`` from ``model`` in place. Returns what went wrong (None if the result
    equals the masked model; else restore the half-changed model) and the measured difference.
    """
    modules = dict(model.named_modules())
    graph = Graph(model, example, [modules[n] for n in ignored])
    reads: dict[nn.Module, list[int]] = {}
    try:
        zeros = [z for root, idxs in plan.items() for z in graph.zeros(root, idxs, reads)]
    except _Unchecked as exc:
        return f"{exc}: removing some is not the same as zeroing them", {}
    with channels_zeroed(zeros):
        masked, head = outputs(model, example)
    if head is not None:
        masked[-1] = without(masked[-1], head, reads.get(head, []))
    try:
        for root, idxs in plan.items():
            graph.remove(root, idxs)
        pruned, _ = outputs(model, example, head)
    except Exception as exc:  # torch-pruning refused, or the smaller model does not run
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", {}
    found = mismatch(pruned, masked)
    if found is not None:
        return f"the smaller model computes something else ({found})", {}
    return None, difference(pruned, masked)


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put ``backup``'s state (modules, parameters, attributes) back into ``model`` in place."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def _refuse(model: nn.Module, plan: dict[str, list[int]], example: torch.Tensor,
            ignored: list[str], problem: str) -> None:
    """Raise naming the roots whose removal alone is wrong (all of them if none is alone)."""
    at_fault = [root for root in plan if _remove_checked(copy.deepcopy(model), {root: plan[root]},
                                                         example, ignored)[0] is not None]
    roots = at_fault or list(plan)
    named = ", ".join(map(repr, roots[:8])) + (f" and {len(roots) - 8} more" if len(roots) > 8
                                               else "")
    raise InvalidValueError(
        f"removing channels of layer{'s' if len(roots) > 1 else ''} {named} breaks the model "
        f"({problem}): an operation after it (a reshape, channel shuffle or custom operation) "
        f"cannot be followed by the dependency graph. Leave it out with exclude={roots!r}"
    ) from None


def replay_structure(model: nn.Module, history: list[dict]) -> nn.Module:
    """Repeat recorded removals (and widenings: :func:`prunelab.slim.widen`) on a freshly built
    model, giving it the recorded architecture."""
    for step in history:
        example = zeros_input(model, step["input_shape"])
        if "widen" in step:
            from prunelab.slim.widen import resize_groups  # slim builds on this module

            resize_groups(model, step["widen"], example, step.get("exclude", []))
        else:
            apply_plan(model, step["plan"], example)
        # The original's size (later targets are relative to it) and the rounding used.
        getattr(model, STRUCTURE_ATTR)[-1].update(
            {key: step[key] for key in ("reference", "round_to", "factor") if key in step})
    return model


def removals(model: nn.Module) -> list[dict]:
    """The removals recorded on ``model`` since its last widening: a widened model is the
    original that later targets are relative to."""
    history = structure_of(model)
    widened = [i for i, step in enumerate(history) if "widen" in step]
    return history[widened[-1] + 1:] if widened else history


def removed_so_far(model: nn.Module) -> dict[str, int]:
    """How many channels each group root has lost in the removals recorded on ``model``."""
    removed: dict[str, int] = {}
    for step in removals(model):
        for root, idxs in step["plan"].items():
            removed[root] = removed.get(root, 0) + len(idxs)
    return removed


def structure_of(model: nn.Module) -> list[dict]:
    """The removals applied to ``model`` so far (empty for an unpruned model)."""
    return list(getattr(model, STRUCTURE_ATTR, []))
