"""Per-layer density distributions: how a total weight budget is split among layers.

Sparse training from scratch fixes each layer's density up front. Uniform gives every layer the
same density; Erdős–Rényi (ER, Mocanu et al. 2018) makes a layer's density proportional to
``(n_in + n_out) / (n_in · n_out)``; Erdős–Rényi-Kernel (ERK, Evci et al. 2020) to
``sum(shape) / prod(shape)``, so kernels count too. Both scale by one factor ε chosen so that the
kept weights add up to the target; a layer whose density would exceed 1 is made dense and ε is
solved again over the rest (Evci et al.'s redistribution). Layers can be forced dense (the first
layer, as RigL does on ImageNet); they count toward the budget, so the total stays exact.

Counts are integers, allocated by largest remainder, so the kept weights add up to exactly
``round(density × total)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from prunelab.errors import InvalidValueError

DISTRIBUTIONS = ("uniform", "er", "erk")


def _raw(shape: Sequence[int], kind: str) -> float:
    """The unscaled density of a layer of ``shape`` under ``kind``."""
    n = math.prod(shape)
    if kind == "uniform":
        return 1.0
    if kind == "er":
        n_out, n_in = shape[0], (shape[1] if len(shape) > 1 else 1)
        return (n_in + n_out) / (n_in * n_out)
    return sum(shape) / n


def layer_densities(
    shapes: Sequence[Sequence[int]],
    density: float,
    kind: str = "erk",
    dense: Collection[int] = (),
) -> list[float]:
    """Density of each layer (in ``[0, 1]``) so that the layers keep ``density`` of all weights.

    ``shapes`` are the weight shapes (``(out, in, *kernel)``), ``dense`` the indices of layers
    kept whole. Raises when the dense layers alone exceed the budget.
    """
    if kind not in DISTRIBUTIONS:
        raise InvalidValueError(f"unknown density distribution {kind!r}; choose one of "
                                f"{', '.join(DISTRIBUTIONS)}")
    if not 0.0 < density <= 1.0:
        raise InvalidValueError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    if not sizes or min(sizes) <= 0:
        raise InvalidValueError(f"layer_densities needs at least one layer and no empty weight "
                                f"shape, got {[tuple(s) for s in shapes]}")
    whole = set(dense)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(shapes)
           for i in whole):
        raise InvalidValueError(f"dense holds indices of the {len(shapes)} layers (0 to "
                                f"{len(shapes) - 1}), got {sorted(whole, key=str)}")
    raw = [_raw(s, kind) for s in shapes]
    budget = density * sum(sizes)
    while True:
        rest = [i for i in range(len(shapes)) if i not in whole]
        left = budget - sum(sizes[i] for i in whole)
        if left < -1e-9 * budget:
            raise InvalidValueError(
                f"density {density} keeps {budget:,.0f} weights, fewer than the "
                f"{sum(sizes[i] for i in whole):,} of the layers kept dense; raise the density "
                "or keep fewer layers dense")
        if not rest:
            return [1.0] * len(shapes)
        scale = max(left, 0.0) / sum(raw[i] * sizes[i] for i in rest)
        over = [i for i in rest if raw[i] * scale > 1.0]
        if not over:
            return [1.0 if i in whole else raw[i] * scale for i in range(len(shapes))]
        top = max(raw[i] for i in over)  # densest first, then solve again (Evci et al.)
        whole |= {i for i in over if raw[i] == top}


def layer_keep_counts(
    shapes: Sequence[Sequence[int]],
    density: float,
    kind: str = "erk",
    dense: Collection[int] = (),
) -> list[int]:
    """Weights kept per layer: :func:`layer_densities` rounded so that they add up to exactly
    ``round(density × total)`` (largest remainder; no layer above its size)."""
    sizes = [math.prod(s) for s in shapes]
    wanted = [d * n for d, n in zip(layer_densities(shapes, density, kind, dense), sizes,
                                     strict=True)]
    counts = [min(math.floor(w), n) for w, n in zip(wanted, sizes, strict=True)]
    short = round(density * sum(sizes)) - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: counts[i] - wanted[i])
    for i in order:
        if short <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            short -= 1
    return counts
