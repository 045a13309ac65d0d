"""Channel groups and their physical removal, on torch-pruning's dependency graph.

A *channel group* is a set of channels that must be removed together: the output channels of a
convolution (or Linear), the BatchNorm after it, the input channels of every layer that reads
them, and, across a residual addition or a concatenation, the matching channels of every other
branch. torch-pruning traces the model once and finds these couplings for any architecture; this
module turns its groups into plain data (names and sizes) and applies removals by name, so a
removal plan can be applied to a copy, replayed after loading a checkpoint, and saved as JSON.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.sparsity import masked_modules
from prunelab.utils import iter_batches

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STRUCTURE_ATTR = "_prunelab_structure"  # removal history kept on the model, saved with it


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
    model: ``model.input_dtype``)."""
    return torch.zeros(1, *shape, dtype=getattr(model, "input_dtype", torch.float32))


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
            with warnings.catch_warnings():
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
        """Every prunable channel group, rooted at a Conv/Linear output, in module order."""
        tp_groups = self.graph.get_all_groups(ignored_layers=self.ignored,
                                              root_module_types=ROOT_TYPES)
        found = []
        for group in tp_groups:
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

    def remove(self, root: str, idxs: Iterable[int]) -> None:
        """Physically remove channels ``idxs`` of the group rooted at layer ``root``."""
        module = dict(self.model.named_modules())[root]
        pruner = self.graph.get_pruner_of_module(module)
        group = self.graph.get_pruning_group(module, pruner.prune_out_channels, sorted(idxs))
        group.prune()


def apply_plan(model: nn.Module, plan: dict[str, list[int]], example: torch.Tensor,
               ignored: Sequence[nn.Module] = ()) -> nn.Module:
    """Remove the planned channels (``{root layer: indices}``) from ``model`` in place.

    The plan is recorded on the model (with the input shape it was traced with), so the same
    architecture can be rebuilt from the original model: see :func:`replay_structure`.
    """
    plan = {root: sorted(int(i) for i in idxs) for root, idxs in plan.items() if len(idxs)}
    if not plan:
        return model
    graph = Graph(model, example, ignored)
    for root, idxs in plan.items():
        graph.remove(root, idxs)
    history = getattr(model, STRUCTURE_ATTR, None)
    if history is None:
        history = []
        setattr(model, STRUCTURE_ATTR, history)
    history.append({"plan": plan, "input_shape": list(example.shape[1:])})
    return model


def replay_structure(model: nn.Module, history: list[dict]) -> nn.Module:
    """Repeat recorded removals on a freshly built model, giving it the pruned architecture."""
    for step in history:
        apply_plan(model, step["plan"], zeros_input(model, step["input_shape"]))
    return model


def structure_of(model: nn.Module) -> list[dict]:
    """The removals applied to ``model`` so far (empty for an unpruned model)."""
    return list(getattr(model, STRUCTURE_ATTR, []))
