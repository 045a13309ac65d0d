"""``prune``: the one entry point for every method."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from prunelab.methods import METHODS, LayerSelection, Method


def prune(
    model: nn.Module,
    method: str | Method,
    sparsity: float = 0.5,
    scope: str = "global",
    data: Iterable | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    exclude_first: bool = False,
    exclude_last: bool = False,
    layer_sparsity: Mapping[str, float] | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` in place with a registered method and return it.

    Args:
        model: any ``nn.Module``; its Linear/Conv/ConvTranspose weights are prunable.
        method: a registered name (``prunelab methods`` lists them) or a method instance.
        sparsity: target fraction of prunable weights that are zero afterwards, in [0, 1).
            Weights pruned earlier stay pruned and count toward the target, so calling ``prune``
            repeatedly with rising targets is iterative pruning.
        scope: ``"global"`` ranks all layers together (one threshold); ``"layer"`` prunes the
            same fraction of every layer.
        data: iterable of batches (tensors or ``(inputs, labels)``) for data-driven methods.
        include, exclude: glob patterns on layer names (``"features.*"``) choosing the layers.
        exclude_first, exclude_last: leave the first / last prunable layer dense.
        layer_sparsity: ``{pattern: sparsity}`` overrides; matching layers are pruned to their
            own ratio and left out of the shared pool.
        **options: method options (see ``prunelab methods``), e.g. ``seed=`` for ``random``.

    Example:
        >>> model = prunelab.models.create("resnet20")
        >>> prunelab.prune(model, "magnitude", sparsity=0.9, exclude_first=True)
    """
    if isinstance(method, str):
        method = METHODS.get(method).create(**options)
    elif options:
        raise TypeError("options can only be given with a method name, not a method instance")
    selection = LayerSelection(
        include=tuple(include) if include is not None else None,
        exclude=tuple(exclude),
        exclude_first=exclude_first,
        exclude_last=exclude_last,
        layer_sparsity=dict(layer_sparsity or {}),
    )
    return method.prune(model, sparsity, scope=scope, data=data, selection=selection)
