"""AutoSlim: per-layer channel counts searched greedily on a trained US-Net.

Starting from the largest width, each round tries shrinking every channel group by one step
(``step`` of its channels, at least ``round_to``) and keeps the one shrink that costs the least
validation accuracy (ties: the lower loss), until the cost falls under the budget: the MACs, or
the latency predicted from every layer's time measured on a deployment backend (the table of
:mod:`prunelab.structured.latency`, measured once per machine and cached). Candidates are
evaluated with BatchNorm normalising by each validation batch's own statistics (the paper's large
evaluation batch), so no calibration is needed per candidate and nothing in the net changes. A
group never goes below its channels at the US-Net's smallest width, so no layer disappears. The
first configuration under each budget is kept (the search walks down through all budgets once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

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
    speedup: float | Sequence[float] | None = None,
    latency_speedup: float | Sequence[float] | None = None,
    example_input: torch.Tensor | None = None,
    backend: str = "torch",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    step: float = 0.1,
    limit: int | None = None,
) -> dict[str, int] | list[dict[str, int]]:
    """Channels per group (``{group root: channels}``) meeting each budget: a MACs ``speedup``,
    or a ``latency_speedup`` predicted from layer times measured on ``backend`` in ``precision``
    at the batch size of ``example_input`` (default: the first validation batch).

    ``val_data`` must be held-out batches (not the test set); ``limit`` caps how many are used
    per evaluation. A list of speed-ups gives a list of configurations in the same order.
    Export one with :func:`prunelab.slim.export` and train it from scratch.
    """
    spec = spec_of(net)
    if not spec.universal:
        raise InvalidValueError(
            "autoslim searches per-layer widths, which needs a US-Net (convert with "
            "width_range=(lo, hi)); an S-Net only runs at its fixed widths")
    if (speedup is None) == (latency_speedup is None):
        raise InvalidValueError("give autoslim one budget: speedup (MACs) or latency_speedup "
                                "(measured layer latencies)")
    budget = speedup if latency_speedup is None else latency_speedup
    name = "speedup" if latency_speedup is None else "latency_speedup"
    speedups = [budget] if isinstance(budget, (int, float)) else list(budget)
    if not speedups or any(isinstance(s, bool) or not isinstance(s, (int, float))
                           or not 1 <= s < math.inf for s in speedups):
        raise InvalidValueError(f"{name} must be a number >= 1 (or a list), got {budget!r}")
    if not 0 < step < 1:
        raise InvalidValueError(f"step is a fraction of a group's channels in (0, 1), got {step}")
    if latency_speedup is None:
        def cost(config: Width) -> float:
            return macs(net, config)
    else:
        example = example_input if example_input is not None else _first_inputs(val_data, net)
        cost = latency_cost(net, example, backend, precision, cache_dir)
    floor = spec.counts(spec.min_width)
    counts = list(spec.counts(spec.max_width))
    full, least = cost(_config(spec, counts)), cost(_config(spec, floor))
    if full <= 0:
        raise InvalidValueError(
            f"the layers of this net are predicted to take no time on {backend} beyond a call's "
            "overhead (too small to time apart); give a speedup (MACs) budget instead")
    reach = full / least if least > 0 else math.inf
    if max(speedups) > reach + 1e-9:
        raise InvalidValueError(
            f"{name} {max(speedups):g} is out of reach: this US-Net goes from 1x to "
            f"{reach:.3g}x{' (predicted)' if latency_speedup is not None else ''} (width "
            f"{spec.min_width:g} everywhere); convert with a smaller width_range low end for more")
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
        # with every group at its floor, the cost is the smallest, which meets every budget
        counts = list(floor) if best is None else best[1]
        current = cost(_config(spec, counts))
    result = [found[i] for i in range(len(speedups))]
    return result[0] if isinstance(budget, (int, float)) else result


def latency_cost(net: nn.Module, example: torch.Tensor, backend: str = "torch",
                 precision: str = "fp32", cache_dir: str | Path | None = None
                 ) -> Callable[[Width], float]:
    """The predicted milliseconds of ``net``'s Conv/Linear layers at a width (uniform or per
    layer), from a :class:`~prunelab.structured.latency.LatencyTable` of its layers (up to its
    largest width) timed on ``backend`` at ``example``'s batch size."""
    from prunelab.structured.latency import LatencyTable, check_backend, layer_shapes

    check_backend(backend, precision, "a latency budget")
    spec = spec_of(net)
    with width(net, spec.max_width):
        shapes = layer_shapes(net, example)
    top = spec.layer_widths(spec.max_width)
    shapes = {name: replace(shape, in_channels=top[name][0], out_channels=top[name][1])
              for name, shape in shapes.items() if name in top}
    steps = {name: (spec.round_to, spec.round_to) for name in shapes}
    table = LatencyTable(shapes, steps, batch_size=int(example.shape[0]), backend=backend,
                         precision=precision, cache_dir=cache_dir)
    return lambda config: table.predict(spec.layer_widths(config))


def _first_inputs(data: Iterable, net: nn.Module) -> torch.Tensor:
    for x, _ in iter_batches(data, net, 1):
        return x
    raise InvalidValueError("autoslim needs validation batches; val_data is empty")


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
