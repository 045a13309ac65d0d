"""Channel counts that suit the machine's kernels: which multiple each layer keeps.

Convolution and matrix kernels work on vectors of channels (16 float32 lanes with AVX-512, 8 with
AVX2, tiles of 8 on GPUs); a layer left with 37 channels runs its last vector part-empty, so a
pruned model measures well below its theoretical speed-up. Rounding every kept count to a
multiple of the vector width recovers much of that (issue 14's table: 0.66 → 0.79 of the
theoretical speed-up for ResNet-56 at 2×, batch 64).
"""

from __future__ import annotations

import torch

from prunelab.structured.graph import ChannelGroup

Plan = dict[str, list[int]]

#: float32 lanes per vector of each CPU capability torch reports (128-bit vectors otherwise).
CPU_LANES = {"AVX512": 16, "AVX2": 8}
OTHER_CPU_LANES = 4
GPU_MULTIPLE = 8
#: The automatic multiple never exceeds a quarter of a layer, so a small layer can still shrink.
MIN_MULTIPLES_PER_LAYER = 4


def kernel_multiple(device: torch.device | str = "cpu") -> int:
    """The channel multiple the kernels of ``device`` want: 16 with AVX-512, 8 with AVX2,
    8 on GPUs, 4 otherwise (a 128-bit vector of float32)."""
    if torch.device(device).type != "cpu":
        return GPU_MULTIPLE
    return CPU_LANES.get(torch.backends.cpu.get_cpu_capability(), OTHER_CPU_LANES)


def layer_multiple(size: int, machine: int) -> int:
    """The multiple a group of ``size`` channels keeps automatically: the machine's, halved
    until the group holds at least four of them (64+ channels keep multiples of 16 on AVX-512,
    32+ of 8, 16+ of 4)."""
    multiple = machine
    while multiple > 1 and size < MIN_MULTIPLES_PER_LAYER * multiple:
        multiple //= 2
    return multiple


def round_plan(plan: Plan, groups: list[ChannelGroup], scores: list[torch.Tensor],
               multiples: list[int]) -> Plan:
    """Adjust ``plan`` so that each group keeps a multiple of its entry in ``multiples``.

    Groups sharing a multiple are rounded together (see :func:`_rounded`), so the total
    removed stays near the plan's.
    """
    out: Plan = {}
    for multiple in sorted(set(multiples)):
        picked = [i for i, m in enumerate(multiples) if m == multiple]
        part = {groups[i].root: plan[groups[i].root] for i in picked if groups[i].root in plan}
        out |= _rounded(part, [groups[i] for i in picked], [scores[i] for i in picked], multiple)
    return out


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
