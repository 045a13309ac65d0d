"""Targets other than a sparsity: compression ratio or FLOPs speed-up, solved by bisection.

A target is ``(kind, value)``: ``sparsity`` (fraction of prunable weights, or of channels for
structured methods), ``compression`` (params / non-zero params), ``speedup`` (dense FLOPs /
pruned FLOPs) or ``latency`` (a speed-up predicted from measured layer latencies; structured
methods only, :mod:`prunelab.structured.latency`). Methods turn a ratio into a pruned model;
:func:`solve_ratio` finds the ratio that reaches a compression or speed-up by pruning copies and
measuring them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prunelab.errors import InvalidValueError

TARGET_KINDS = ("sparsity", "compression", "speedup", "latency")


def check_target(kind: str, value: float) -> None:
    if kind not in TARGET_KINDS:
        raise InvalidValueError(f"target must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")
    if kind != "sparsity" and not 1 <= value < math.inf:
        raise InvalidValueError(f"a {kind} target is a ratio >= 1 (e.g. 2.0), got {value}")


def solve_ratio(achieved: Callable[[float], float], goal: float, kind: str,
                high: float = 0.999, steps: int = 16) -> float:
    """The smallest ratio in [0, ``high``] whose ``achieved(ratio)`` reaches ``goal``.

    ``achieved`` must grow with the ratio (more pruning, more compression or speed-up). An
    unreachable goal raises an error that says what is reachable.
    """
    best = achieved(high)
    if best < goal:
        raise InvalidValueError(
            f"a {goal:g}x {kind} is out of reach: pruning as much as this method can "
            f"(ratio {high:g}) gives {best:.2f}x. Ask for at most that, or prune more layers"
        )
    low = 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        if achieved(middle) < goal:
            low = middle
        else:
            high = middle
    return high
