"""AutoSlim: per-layer channel counts searched greedily on a trained US-Net.

Starting from the largest width, each round tries shrinking every channel group by one step
(``step`` of its channels, at least ``round_to``) and keeps the one shrink that costs the least
validation accuracy (ties: the lower loss), until the MACs fall under the budget. Candidates are
evaluated with BatchNorm normalising by each validation batch's own statistics (the paper's large
evaluation batch), so no calibration is needed per candidate and nothing in the net changes. A
group never goes below its channels at the US-Net's smallest width, so no layer disappears. The
first configuration under each budget is kept (the search walks down through all budgets once).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.slim.layers import SlimBatchNorm, SwitchableBatchNorm
from prunelab.slim.supernet import SlimSpec, Width, spec_of, width
from prunelab.utils import iter_batches


def macs(net: nn.Module, w: Width) -> int:
    """Multiply-accumulates of one input through ``net`` at width ``w`` (counted from the
    layers' shapes, without running the net)."""
    return spec_of(net).macs(w)


def autoslim(
    net: nn.Module,
    val_data: Iterable,
    *,
    speedup: float | Sequence[float],
    step: float = 0.1,
    limit: int | None = None,
) -> dict[str, int] | list[dict[str, int]]:
    """Channels per group (``{group root: channels}``) meeting each MACs ``speedup``.

    ``val_data`` must be held-out batches (not the test set); ``limit`` caps how many are used
    per evaluation. A list of speed-ups gives a list of configurations in the same order.
    Export one with :func:`prunelab.slim.export` and train it from scratch.
    """
    spec = spec_of(net)
    if not spec.universal:
        raise InvalidValueError(
            "autoslim searches per-layer widths, which needs a US-Net (convert with "
            "width_range=(lo, hi)); an S-Net only runs at its fixed widths")
    speedups = [speedup] if isinstance(speedup, (int, float)) else list(speedup)
    if not speedups or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 1
                           for s in speedups):
        raise InvalidValueError(f"speedup must be a number >= 1 (or a list), got {speedup!r}")
    if not 0 < step < 1:
        raise InvalidValueError(f"step is a fraction of a group's channels in (0, 1), got {step}")
    full = macs(net, spec.max_width)
    smallest = macs(net, spec.min_width)
    reach = full / smallest
    if max(speedups) > reach + 1e-9:
        raise InvalidValueError(
            f"speedup {max(speedups):g} is out of reach: this US-Net goes from 1x to "
            f"{reach:.3g}x (width {spec.min_width:g} everywhere); convert with a smaller "
            "width_range low end for more")
    floor = spec.counts(spec.min_width)
    counts = list(spec.counts(spec.max_width))
    steps = [max(spec.round_to, round(step * g.size)) for g in spec.groups]
    pending = sorted(range(len(speedups)), key=lambda i: speedups[i])
    found: dict[int, dict[str, int]] = {}
    current = full
    while pending:
        while pending and current <= full / speedups[pending[0]] + 1e-9:
            found[pending.pop(0)] = _config(spec, counts)
        if not pending:
            break
        best = None
        for g in range(len(counts)):
            smaller = max(floor[g], counts[g] - steps[g])
            if smaller >= counts[g]:
                continue
            trial = [*counts[:g], smaller, *counts[g + 1:]]
            score = _evaluate(net, _config(spec, trial), val_data, limit)
            if best is None or score > best[0]:
                best = (score, trial)
        # with every group at its floor, the MACs are the smallest, which meet every budget
        counts = list(floor) if best is None else best[1]
        current = macs(net, _config(spec, counts))
    result = [found[i] for i in range(len(speedups))]
    return result[0] if isinstance(speedup, (int, float)) else result


def _config(spec: SlimSpec, counts: Sequence[int]) -> dict[str, int]:
    return {g.root: int(k) for g, k in zip(spec.groups, counts, strict=True)}


def _evaluate(net: nn.Module, config: dict[str, int], data: Iterable,
              limit: int | None) -> tuple[float, float]:
    """(accuracy, -loss) at ``config``, BatchNorm on each batch's own statistics."""
    norms = [m for m in net.modules() if isinstance(m, (SlimBatchNorm, SwitchableBatchNorm))]
    was_training = net.training
    correct = total = 0
    loss = 0.0
    with width(net, config):
        for module in norms:
            module.slim_calibration = [None, None, 0]  # batch statistics, nothing stored
        try:
            net.eval()
            with torch.no_grad():
                for x, y in iter_batches(data, net, limit):
                    if y is None:
                        raise InvalidValueError("autoslim needs labelled (inputs, labels) batches")
                    logits = net(x)
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(1) == y).sum())
                    total += len(y)
        finally:
            for module in norms:
                module.slim_calibration = None
            net.train(was_training)
    return correct / total, -loss / total
