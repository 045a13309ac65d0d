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
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import ALL_LAYERS, Count, LayerSelection, Method
from prunelab.metrics import count_parameters, flops_per_module
from prunelab.sparsity import check_sparsity
from prunelab.sparsity.masks import check_layer_patterns, matches_any
from prunelab.structured.graph import (
    ROOT_TYPES,
    ChannelGroup,
    Graph,
    _restore,
    apply_plan,
    as_example,
    head_block,
    output_layers,
    removals,
    removed_so_far,
    structure_of,
)
from prunelab.structured.latency import LatencyTarget
from prunelab.structured.rounding import kernel_multiple, layer_multiple, round_plan
from prunelab.targets import solve_ratio

Plan = dict[str, list[int]]
MIN_CHANNELS = 1  # a group never loses its last channel


@dataclass
class StructuredMethod(Method):
    """Base of methods that remove whole channels/filters/neurons (the model gets smaller)."""

    granularity: ClassVar[str] = "channel"
    targets: ClassVar[tuple[str, ...]] = ("sparsity", "compression", "speedup", "latency")
    scopes: ClassVar[tuple[str, ...]] = ("global", "layer")
    #: Raw scores can be ranked across layers (BN scales) or are normalised per group first.
    comparable_across_layers: ClassVar[bool] = False
    #: Keep a multiple of this many channels per layer (a layer with no more channels than this
    #: keeps them all); ``None``: the multiple the machine's kernels want (16 with AVX-512, 8
    #: with AVX2 or on a GPU), never more than a quarter of a layer; 1 keeps exact counts.
    round_to: Count | None = None
    #: Why :meth:`accepts` leaves a group alone (said when it does).
    rejects: ClassVar[str] = ""

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
        backend: str = "torch",
        precision: str = "fp32",
    ) -> nn.Module:
        """Remove channels: ``sparsity`` is the fraction of channels, or with ``target`` set to
        ``compression``/``speedup`` the parameter or FLOPs reduction factor to reach, or with
        ``latency`` the speed-up predicted by layer latencies measured on ``backend`` in
        ``precision`` at the example input's batch size (:mod:`prunelab.structured.latency`).

        Targets are relative to the model before its first removal (recorded on the model), so
        calling ``prune`` again with a higher target prunes on to it rather than compounding;
        a target already reached removes nothing. The classifier's outputs are never removed.
        The smaller model's output is checked against the masked model's (see
        :func:`~prunelab.structured.graph.apply_plan`).
        """
        if target == "sparsity":
            check_sparsity(sparsity, "channel ratio")
        self.check_request(target, sparsity, scope)
        if self.needs_data and data is None:
            raise InvalidValueError(
                f"method {self.name!r} needs calibration data: pass data=<iterable of batches>"
            )
        example = as_example(model, example_input, data)
        ignored = self._ignored(model, example, selection)
        graph = Graph(model, example, ignored)
        groups = self._selected(graph.groups(), selection)
        if graph.untraceable:
            warnings.warn(
                f"{len(graph.untraceable)} layer(s) stay whole because the dependency graph "
                f"cannot index their channels (a channel shuffle or custom reshape after them), "
                f"e.g. {graph.untraceable[0]!r}", stacklevel=3)
        scores = [s.detach().float().cpu() for s in self.channel_scores(model, groups, data)]
        for group, score in zip(groups, scores, strict=True):
            if not torch.isfinite(score).all():
                raise InvalidValueError(
                    f"method {self.name!r} scores channels of layer {group.root!r} as NaN or "
                    "infinite (the weights or activations there are not finite): fix or "
                    "re-train the model before pruning it")
        done = removed_so_far(model)

        blocks = [head_block(model, g) for g in groups]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        machine = kernel_multiple(device)
        multiples = [layer_multiple(g.size + done.get(g.root, 0), machine)
                     if self.round_to is None else self.round_to for g in groups]

        def plan_for(ratio: float) -> Plan:
            plan = _plan(groups, scores, ratio, scope, selection.layer_sparsity,
                         self.comparable_across_layers, self.channel_count, done, blocks)
            whole = [b > 1 for b in blocks]  # heads are already whole multiples
            rounded = round_plan(plan, *_unless(whole, groups, scores, multiples))
            rounded |= {g.root: plan[g.root] for g, w in zip(groups, whole, strict=True)
                        if w and g.root in plan}
            return _symmetric(rounded, groups, scores)

        reference = original_size(model, example)
        ratio = sparsity
        latency = None
        if target == "latency":
            if selection.layer_sparsity:
                raise InvalidValueError(
                    "layer_sparsity overrides fix some layers' ratios, a latency target lets "
                    "the measured times decide them: give one or the other")
            latency = LatencyTarget(model, example, groups, blocks, multiples, done, backend,
                                    precision)
            if scope == "global":
                units = [_units(s, b, self.comparable_across_layers)
                         for s, b in zip(scores, blocks, strict=True)]
                counts = latency.greedy(units, sparsity)
                plan = _symmetric({g.root: _expand(u.argsort(stable=True)[:n // b].tolist(), b)
                                   for g, u, n, b in zip(groups, units, counts, blocks,
                                                         strict=True) if n},
                                  groups, scores)
            else:
                ratio = latency.solve_ratio(plan_for, sparsity)
        elif target != "sparsity":
            dense = reference[_KEYS[target]]
            if dense is None:
                raise InvalidValueError(
                    f"this model was first pruned with inputs of shape "
                    f"{tuple(reference['input_shape'])}: a speedup target needs an "
                    "example_input of that shape (FLOPs are relative to the original model)")
            try:
                ratio = solve_ratio(
                    lambda r: dense / _size(_pruned_copy(model, plan_for(r), example, ignored),
                                            example, target),
                    sparsity, target,
                )
            except InvalidValueError as exc:
                if max(multiples) <= 1:
                    raise
                said = (f"round_to={self.round_to}" if self.round_to is not None else
                        f"the automatic round_to (multiples of up to {machine})")
                raise InvalidValueError(
                    f"{exc}; {said} keeps channel counts on multiples and small layers whole, "
                    "round_to=1 reaches further") from None
        if latency is None or scope != "global":
            plan = plan_for(ratio)
        self._report(groups, plan, done)
        if not any(plan.values()) and done:
            warnings.warn(f"the model is already pruned to this target ({sparsity} {target}) or "
                          "beyond: nothing more is removed", stacklevel=3)
        before = copy.deepcopy(model) if _overrides(self, "reconstruct") else None
        self.reconstruct(model, groups, plan, data)
        steps = len(structure_of(model))
        try:
            apply_plan(model, plan, example, ignored)
        except InvalidValueError:
            if before is not None:
                _restore(model, before)  # undo the reconstruction too
            raise
        self._record(model, steps, reference,
                     self.round_to if self.round_to is not None else f"auto({machine})",
                     None if latency is None else latency.record(plan))
        return model

    @staticmethod
    def _record(model: nn.Module, steps: int, reference: dict, round_to: int | str,
                latency: dict | None) -> None:
        """Note a call's removal (if it removed anything: the history grew past ``steps``) in
        the model's structure history: the original size on the first removal, the rounding
        and, for a latency target, the predicted latencies."""
        history = structure_of(model)
        if len(history) <= steps:
            return
        if len(removals(model)) == 1:  # the first removal (since any widening)
            history[-1]["reference"] = reference
        history[-1]["round_to"] = round_to
        if latency is not None:
            history[-1]["latency"] = latency

    def _report(self, groups: list[ChannelGroup], plan: Plan, done: dict[str, int]) -> None:
        """Warn when the method left groups alone, with what the plan reaches overall."""
        if not self._skipped:
            return
        total = sum(g.size + done.get(g.root, 0) for g in groups)
        removed = sum(len(plan.get(g.root, [])) + done.get(g.root, 0) for g in groups)
        everything = total + sum(self._skipped.values())
        warnings.warn(
            f"{self.name} pruned {len(groups)} of {len(groups) + len(self._skipped)} channel "
            f"groups ({self.rejects} for {', '.join(list(self._skipped)[:3])}"
            f"{', ...' if len(self._skipped) > 3 else ''}): it removed {removed / total:.0%} of "
            f"their channels, {removed / everything:.0%} of all {everything}; a compression "
            "or speedup target is reached over the groups it can prune", stacklevel=3)

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
        """The groups to prune. Groups whose removal cannot equal zeroing their channels
        (a LayerNorm, attention) stay whole, said in a warning; groups :meth:`accepts`
        refuses are remembered for the report."""
        if selection.include is not None:
            groups = [g for g in groups if matches_any(g.root, selection.include)]
        groups = [g for g in groups if g.size > MIN_CHANNELS]
        if not groups:
            raise InvalidValueError("no channel group is left to prune: check include/exclude")
        blocked = [(g.root, g.blocker) for g in groups if g.blocker]
        if blocked:
            warnings.warn(
                f"{len(blocked)} channel group(s) stay whole because their channels cannot be "
                f"removed as if zeroed, e.g. {blocked[0][0]!r}: {blocked[0][1]}", stacklevel=4)
        groups = [g for g in groups if not g.blocker]
        accepted = [g for g in groups if self.accepts(g)]
        taken = {id(g) for g in accepted}
        self._skipped = {g.root: g.size for g in groups if id(g) not in taken}
        if groups and not accepted:
            raise InvalidValueError(
                f"method {self.name!r} cannot prune any channel group of this model: "
                f"{self.rejects or 'it accepts none of them'}")
        if not accepted:
            raise InvalidValueError("no channel group is left to prune: check include/exclude")
        return accepted


def _plan(groups: list[ChannelGroup], scores: list[torch.Tensor], ratio: float, scope: str,
          overrides: dict[str, float], comparable: bool,
          count: Callable[[float, int], int], done: dict[str, int],
          blocks: list[int] | None = None) -> Plan:
    """Channels to remove per group root: lowest scores first, never a group's last channel.

    Ratios are of the original channels (``done``: how many each group lost before), so a
    repeated call prunes on to the target instead of compounding. A group with a block size
    ``b > 1`` (attention heads of ``b`` channels) is ranked and removed in whole blocks scored
    by their mean; it keeps at least one block.
    """
    blocks = blocks or [1] * len(groups)
    units = [_units(s, b, comparable=True) for s, b in zip(scores, blocks, strict=True)]
    plan: Plan = {}
    shared: list[int] = []
    for i, group in enumerate(groups):
        own = next((v for p, v in overrides.items() if fnmatch.fnmatchcase(group.root, p)), None)
        if own is None and scope == "global":
            shared.append(i)
            continue
        original = group.size + done.get(group.root, 0)
        wanted = count(ratio if own is None else own, original) - done.get(group.root, 0)
        removed = max(min(round(wanted / blocks[i]), len(units[i]) - MIN_CHANNELS), 0)
        plan[group.root] = _expand(units[i].argsort(stable=True)[:removed].tolist(), blocks[i])
    if shared:
        # Rank every unit but each group's best together (so each keeps >= 1 unit); a block
        # counts as its channels towards the ratio.
        pooled = []
        for i in shared:
            s = units[i] if comparable else _units(units[i], 1, False)
            order = s.argsort(stable=True)
            pooled += [(float(s[j]), i, int(j)) for j in order[: len(units[i]) - MIN_CHANNELS]]
        total = sum(groups[i].size + done.get(groups[i].root, 0) for i in shared)
        budget = round(ratio * total) - sum(done.get(groups[i].root, 0) for i in shared)
        picked: dict[int, list[int]] = {}
        for _, i, j in sorted(pooled):
            if budget < blocks[i] / 2:
                continue  # a whole block would overshoot by more than half of it
            picked.setdefault(i, []).append(j)
            budget -= blocks[i]
        for i, units_removed in picked.items():
            plan[groups[i].root] = _expand(units_removed, blocks[i])
    return plan


def _expand(units: list[int], block: int) -> list[int]:
    """The channels of the picked ``units`` (blocks of ``block`` channels, e.g. heads)."""
    return sorted(u * block + j for u in units for j in range(block)) if block > 1 else units


def _units(score: torch.Tensor, block: int, comparable: bool) -> torch.Tensor:
    """A group's scores per removable unit (a channel, or a head's mean), normalised by the
    group's mean unless scores compare across layers."""
    units = score.view(-1, block).mean(1) if block > 1 else score
    return units if comparable else units / units.abs().mean().clamp_min(1e-12)


def _unless(skip: list[bool], *columns: list) -> list[list]:
    """Each of ``columns`` without the entries where ``skip`` is true."""
    return [[v for v, s in zip(column, skip, strict=True) if not s] for column in columns]


def _symmetric(plan: Plan, groups: list[ChannelGroup], scores: list[torch.Tensor]) -> Plan:
    """Make removals read by a grouped convolution take the same positions in each of its
    blocks (so every block keeps as many channels, which its weight's shape requires).

    A position's score is the sum over the blocks; about as many channels go as planned.
    """
    out = dict(plan)
    for group, score in zip(groups, scores, strict=True):
        blocks = group.conv_groups
        if blocks == 1 or not plan.get(group.root):
            continue
        if group.size % blocks:
            out.pop(group.root)
            continue
        width = group.size // blocks
        per_block = min(round(len(plan[group.root]) / blocks), width - MIN_CHANNELS)
        positions = score.reshape(blocks, width).sum(0).argsort(stable=True)[:per_block]
        out[group.root] = sorted(b * width + int(p) for b in range(blocks) for p in positions)
    return out


def _pruned_copy(model: nn.Module, plan: Plan, example: torch.Tensor,
                 ignored: list[nn.Module]) -> nn.Module:
    """A pruned copy to measure while searching a target (not checked: only sizes matter)."""
    trial = copy.deepcopy(model)
    index = {m: n for n, m in model.named_modules()}
    trial_modules = dict(trial.named_modules())
    return apply_plan(trial, plan, example, [trial_modules[index[m]] for m in ignored],
                      check=False)


def _size(model: nn.Module, example: torch.Tensor, target: str) -> float:
    """Parameters (for a compression target) or FLOPs (for a speed-up target)."""
    if target == "compression":
        return count_parameters(model)[0]
    return max(flops_per_module(model, example)[0], 1)


_KEYS = {"compression": "params", "speedup": "flops"}


def original_size(model: nn.Module, example: torch.Tensor) -> dict:
    """Parameters and FLOPs of the model before its first removal: recorded then, measured now
    for an unpruned model. The recorded FLOPs hold for the recorded input shape only (None
    for another one)."""
    history = removals(model)
    recorded = history[0].get("reference") if history else None
    if recorded is not None:
        same = recorded["input_shape"] == list(example.shape[1:])
        return {**recorded, "flops": recorded["flops"] if same else None}
    if history:  # pruned before references were recorded: today's model is the reference
        warnings.warn("this model's removal history has no recorded original size: targets "
                      "are relative to the model as it is now", stacklevel=4)
    return {"params": _size(model, example, "compression"),
            "flops": _size(model, example, "speedup"), "input_shape": list(example.shape[1:])}


def _overrides(method: StructuredMethod, name: str) -> bool:
    return getattr(type(method), name) is not getattr(StructuredMethod, name)
