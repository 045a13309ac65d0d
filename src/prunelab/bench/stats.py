"""Aggregation over seeds: mean, standard deviation and a 95% confidence interval."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Mean ± std over ``n`` seeds; ``ci95`` is the half-width of the t-interval (None if n<2)."""

    n: int
    mean: float
    std: float
    ci95: float | None


def summarize(values: Iterable[float]) -> Summary:
    from scipy.stats import t

    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, None)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    ci = float(t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return Summary(n, mean, std, ci)


GROUP_KEYS = ("label", "recovery", "target_kind", "target_value")


def group_rows(rows: Iterable[Mapping[str, Any]], keys: tuple[str, ...] = GROUP_KEYS
               ) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows grouped by ``keys`` (one group per method × recovery × target, seeds inside)."""
    groups: dict[tuple, list] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    return dict(groups)


def table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per method × recovery × target: top-1 mean/std/CI and mean size and speed."""
    lines = []
    runs = [r for r in rows if r.get("method") != "dense"]
    def order(item: tuple) -> tuple:
        label, recovery, kind, value = item[0]
        return str(label), str(recovery), str(kind), value if value is not None else -1.0

    for (label, recovery, kind, value), members in sorted(group_rows(runs).items(), key=order):
        top1 = summarize(r["test_top1"] for r in members)
        lines.append({
            "method": label, "recovery": recovery, "target": f"{kind} {value:g}",
            "seeds": top1.n, "top1_mean": top1.mean, "top1_std": top1.std, "top1_ci95": top1.ci95,
            "compression": statistics.fmean(r["compression"] for r in members),
            "speedup": statistics.fmean(r["theoretical_speedup"] for r in members),
            "measured_speedup": _mean_or_none(r.get("measured_speedup") for r in members),
        })
    return lines


def pareto_front(points: list[tuple[float | None, float]]) -> list[bool]:
    """Which (speed-up, accuracy) points no other point dominates (at least as fast and as
    accurate, better in one). Points without a speed-up (None) are never on the front."""
    known = [(x, y) for x, y in points if x is not None]
    return [x is not None and not any(
        ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in known) for x, y in points]


def mark_pareto(lines: list[dict[str, Any]], dense: Summary | None = None) -> list[dict[str, Any]]:
    """Add ``pareto_theoretical`` / ``pareto_measured`` to each line of :func:`table`: on the
    front of mean top-1 against mean theoretical / measured speed-up. The unpruned model (speed-up
    1) takes part, so a pruned model slower and less accurate than it is never on the front."""
    for key, flag in (("speedup", "pareto_theoretical"), ("measured_speedup", "pareto_measured")):
        points = [(line[key], line["top1_mean"]) for line in lines]
        if dense is not None and dense.n:
            points.append((1.0, dense.mean))
        for line, on in zip(lines, pareto_front(points), strict=False):
            line[flag] = on
    return lines


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
