"""The contract of structured (channel) methods: score channels, remove the lowest for real.

A structured method implements :meth:`StructuredMethod.channel_scores` (one score per channel of
each group, higher = keep) and, optionally, :meth:`StructuredMethod.reconstruct` (adjust the
weights of the layers that read a group before its channels go, as ThiNet and channel regression
do). Choosing how many channels to remove (per layer, globally, or to hit a FLOPs or parameter
target), protecting the classifier, and the physical removal are shared here.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import ALL_LAYERS, LayerSelection, Method
from prunelab.metrics import count_parameters, flops_per_module
from prunelab.sparsity import check_sparsity
from prunelab.sparsity.masks import check_layer_patterns, matches_any
from prunelab.structured.graph import (
    ROOT_TYPES,
    ChannelGroup,
    Graph,
    apply_plan,
    as_example,
    output_layers,
)
from prunelab.targets import check_target, solve_ratio

Plan = dict[str, list[int]]
MIN_CHANNELS = 1  # a group never loses its last channel


@dataclass
class StructuredMethod(Method):
    """Base of methods that remove whole channels/filters/neurons (the model gets smaller)."""

    granularity: ClassVar[str] = "channel"
    #: Raw scores can be ranked across layers (BN scales) or are normalised per group first.
    comparable_across_layers: ClassVar[bool] = False
    #: Keep a multiple of this many channels per layer (8 or 16 suit SIMD kernels best; a layer
    #: with no more channels than this keeps them all).
    round_to: int = 1

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        """One 1-D tensor per group, its length the group's size; higher means keep."""
        raise NotImplementedError

    def accepts(self, group: ChannelGroup) -> bool:
        """Whether this method can prune ``group`` (reconstruction methods need a plain reader)."""
        return True

    def channel_count(self, ratio: float, size: int) -> int:
        """How many of a group's ``size`` channels a per-layer ``ratio`` removes (nearest)."""
        return round(ratio * size)

    def reconstruct(self, model: nn.Module, groups: list[ChannelGroup], plan: Plan,
                    data: Iterable | None) -> None:
        """Adjust weights before the planned channels are removed (default: nothing)."""

    def prune(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        scope: str = "global",
        data: Iterable | None = None,
        selection: LayerSelection = ALL_LAYERS,
        target: str = "sparsity",
        example_input: torch.Tensor | None = None,
    ) -> nn.Module:
        """Remove channels: ``sparsity`` is the fraction of channels, or with ``target`` set to
        ``compression``/``speedup`` the parameter or FLOPs reduction factor to reach.

        The classifier's outputs are never removed.
        """
        check_target(target, sparsity)
        if target == "sparsity":
            check_sparsity(sparsity, "channel ratio")
        if self.round_to < 1:
            raise InvalidValueError(
                f"round_to is a channel multiple >= 1 (1: no rounding; 8 or 16 suit CPU "
                f"kernels), got {self.round_to}")
        if scope not in ("global", "layer"):
            raise InvalidValueError(f"scope of a channel method must be global or layer, got "
                                    f"{scope!r}")
        if self.needs_data and data is None:
            raise InvalidValueError(
                f"method {self.name!r} needs calibration data: pass data=<iterable of batches>"
            )
        example = as_example(model, example_input, data)
        ignored = self._ignored(model, example, selection)
        graph = Graph(model, example, ignored)
        groups = self._selected(graph.groups(), selection)
        if not groups:
            raise InvalidValueError("no channel group is left to prune: check include/exclude")
        scores = [s.detach().float().cpu() for s in self.channel_scores(model, groups, data)]

        def plan_for(ratio: float) -> Plan:
            plan = _plan(groups, scores, ratio, scope, selection.layer_sparsity,
                         self.comparable_across_layers, self.channel_count)
            return _rounded(plan, groups, scores, self.round_to)

        ratio = sparsity
        if target != "sparsity":
            dense = _size(model, example, target)
            try:
                ratio = solve_ratio(
                    lambda r: dense / _size(_pruned_copy(model, plan_for(r), example, ignored),
                                            example, target),
                    sparsity, target,
                )
            except InvalidValueError as exc:
                if self.round_to <= 1:
                    raise
                raise InvalidValueError(
                    f"{exc}; round_to={self.round_to} keeps layers of at most {self.round_to} "
                    "channels whole, a smaller round_to reaches further") from None
        plan = plan_for(ratio)
        _check_plan(model, plan, example, ignored)
        self.reconstruct(model, groups, plan, data)
        return apply_plan(model, plan, example, ignored)

    def _ignored(self, model: nn.Module, example: torch.Tensor, selection: LayerSelection
                 ) -> list[nn.Module]:
        """Layers whose output channels stay: excluded ones, the first if asked, and the
        output layers (the classes; so ``exclude_last`` holds without being asked)."""
        names = dict(model.named_modules())
        layers = [n for n, m in names.items() if isinstance(m, ROOT_TYPES)]
        check_layer_patterns(layers, {"include": selection.include or (),
                                      "exclude": selection.exclude,
                                      "layer_sparsity": selection.layer_sparsity})
        ignored = [names[n] for n in layers if matches_any(n, selection.exclude)]
        if selection.exclude_first and layers:
            ignored.append(names[layers[0]])
        return ignored + output_layers(model, example)  # the classes stay

    def _selected(self, groups: list[ChannelGroup], selection: LayerSelection
                  ) -> list[ChannelGroup]:
        if selection.include is not None:
            groups = [g for g in groups if matches_any(g.root, selection.include)]
        return [g for g in groups if g.size > MIN_CHANNELS and self.accepts(g)]


def _plan(groups: list[ChannelGroup], scores: list[torch.Tensor], ratio: float, scope: str,
          overrides: dict[str, float], comparable: bool,
          count: Callable[[float, int], int]) -> Plan:
    """Channels to remove per group root: lowest scores first, never a group's last channel."""
    plan: Plan = {}
    shared: list[int] = []
    for i, group in enumerate(groups):
        own = next((v for p, v in overrides.items() if fnmatch.fnmatchcase(group.root, p)), None)
        if own is None and scope == "global":
            shared.append(i)
            continue
        removed = min(count(ratio if own is None else own, group.size), group.size - MIN_CHANNELS)
        plan[group.root] = scores[i].argsort(stable=True)[:removed].tolist()
    if shared:
        # Rank every channel but each group's best together (so each keeps >= 1 channel).
        pooled = []
        for i in shared:
            s = scores[i] if comparable else scores[i] / scores[i].abs().mean().clamp_min(1e-12)
            order = s.argsort(stable=True)
            pooled += [(float(s[j]), i, int(j)) for j in order[: groups[i].size - MIN_CHANNELS]]
        total = sum(groups[i].size for i in shared)
        pooled.sort()
        for _, i, j in pooled[: min(round(ratio * total), len(pooled))]:
            plan.setdefault(groups[i].root, []).append(j)
    return plan


def _rounded(plan: Plan, groups: list[ChannelGroup], scores: list[torch.Tensor],
             multiple: int) -> Plan:
    """Adjust the plan so that every group keeps a multiple of ``multiple`` channels.

    A group no larger than ``multiple`` keeps all its channels (it has no smaller multiple).
    Rounding each group on its own would move every same-sized layer the same way and overshoot
    a target by a whole step (a 16-channel stage going to 8 at once); here each kept count is
    rounded down and the channels this frees are handed back, one multiple at a time, to the
    groups rounded down the most (largest remainder), so the total stays near the plan's.
    """
    if multiple <= 1:
        return plan
    wanted: dict[int, int] = {}
    kept: dict[int, int] = {}
    for i, group in enumerate(groups):
        removed = len(plan.get(group.root, []))
        if removed and group.size > multiple:
            wanted[i] = group.size - removed
            kept[i] = max(wanted[i] // multiple * multiple, multiple)
    spare = sum(wanted.values()) - sum(kept.values())
    by_remainder = sorted(wanted, key=lambda i: kept[i] - wanted[i])  # stable: layer order
    for i in by_remainder:
        if spare < multiple / 2:
            break
        if kept[i] + multiple <= groups[i].size:
            kept[i] += multiple
            spare -= multiple
    out: Plan = {}
    for i, (group, score) in enumerate(zip(groups, scores, strict=True)):
        if i in kept:
            out[group.root] = score.argsort(stable=True)[: group.size - kept[i]].tolist()
        elif group.size > multiple:
            out[group.root] = plan.get(group.root, [])
    return out


def _pruned_copy(model: nn.Module, plan: Plan, example: torch.Tensor,
                 ignored: list[nn.Module]) -> nn.Module:
    trial = copy.deepcopy(model)
    index = {m: n for n, m in model.named_modules()}
    trial_modules = dict(trial.named_modules())
    return apply_plan(trial, plan, example, [trial_modules[index[m]] for m in ignored])


def _runs(model: nn.Module, example: torch.Tensor) -> Exception | None:
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as exc:  # any failure of the pruned forward
        return exc
    return None


def _check_plan(model: nn.Module, plan: Plan, example: torch.Tensor,
                ignored: list[nn.Module]) -> None:
    """Try the removal on a copy; if the smaller model no longer runs, name the layer at fault.

    torch-pruning follows standard operations; a custom one (a reshape that mixes channels,
    a hard-coded channel count) breaks after removal. The layer whose removal alone breaks the
    forward is reported, with the exclusion that avoids it.
    """
    error = None
    try:
        error = _runs(_pruned_copy(model, plan, example, ignored), example)
    except Exception as exc:  # torch-pruning itself refused
        error = exc
    if error is None:
        return
    for root, idxs in plan.items():
        try:
            alone = _runs(_pruned_copy(model, {root: idxs}, example, ignored), example)
        except Exception as exc:
            alone = exc
        if alone is not None:
            raise InvalidValueError(
                f"removing channels of layer {root!r} breaks the model ({type(alone).__name__}: "
                f"{str(alone).splitlines()[0][:200]}): an operation after it cannot be followed "
                f"by the dependency graph. Leave it out with exclude=[{root!r}]"
            ) from None
    raise InvalidValueError(
        f"the pruned model no longer runs ({type(error).__name__}: {error}); exclude the layers "
        "around custom operations"
    ) from None


def _size(model: nn.Module, example: torch.Tensor, target: str) -> float:
    """Parameters (for a compression target) or FLOPs (for a speed-up target)."""
    if target == "compression":
        return count_parameters(model)[0]
    return max(flops_per_module(model, example)[0], 1)
