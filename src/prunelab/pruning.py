"""``prune``: the one entry point for every method."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods import METHODS, LayerSelection, Method
from prunelab.structured.method import StructuredMethod
from prunelab.utils import check_input, input_errors


def prune(
    model: nn.Module,
    method: str | Method,
    sparsity: float | None = None,
    scope: str = "global",
    data: Iterable | None = None,
    *,
    compression: float | None = None,
    speedup: float | None = None,
    latency_speedup: float | None = None,
    backend: str = "torch",
    precision: str = "fp32",
    example_input: torch.Tensor | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    exclude_first: bool = False,
    exclude_last: bool = False,
    layer_sparsity: Mapping[str, float] | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` in place with a registered method and return it.

    Args:
        model: any ``nn.Module``; its Linear/Conv/Embedding/attention/RNN weights are prunable,
            and those a custom module declares (:func:`prunelab.sparsity.register_prunable`).
        method: a registered name (``prunelab methods`` lists them) or a method instance.
        sparsity: target fraction of prunable weights that are zero afterwards, in [0, 1)
            (default 0.5); for structured methods, the fraction of channels removed. Weights
            pruned earlier stay pruned and count toward the target, so calling ``prune``
            repeatedly with rising targets is iterative pruning; for structured methods every
            target (channels, compression, speedup) is relative to the model before its first
            removal, recorded on the model, so a repeated call prunes on to it.
        compression: instead of a sparsity, reach params / non-zero params = ``compression``.
        speedup: instead of a sparsity, reach dense FLOPs / pruned FLOPs = ``speedup``.
        latency_speedup: structured methods only: reach a speed-up *predicted from measured
            latencies* of every layer on ``backend`` in ``precision`` (``prunelab.deploy``'s),
            at the batch size of ``example_input``. With ``scope="global"`` the channels go
            where they save the most time per unit of importance (NetAdapt/HALP style); the
            table is measured once per machine and cached (:mod:`prunelab.structured.latency`).
        backend, precision: where a ``latency_speedup`` is measured.
        example_input: an input batch for methods that trace or measure the model (structured
            methods, ``speedup``); by default the first batch of ``data`` or zeros of the zoo
            model's ``input_shape``.
        scope: ``"global"`` ranks all layers together (one threshold); ``"layer"`` prunes the
            same fraction of every layer; ``"er"``/``"erk"`` give each layer its
            Erdős–Rényi(-Kernel) share of the kept weights (Evci et al. 2020) and rank within
            it (:mod:`prunelab.sparsity.distributions`).
        data: iterable of batches (tensors or ``(inputs, labels)``) for data-driven methods.
        include, exclude: glob patterns on layer names (``"features.*"``) choosing the layers;
            a parameter other than ``weight`` is named ``"<module>.<param>"``
            (``"attn.in_proj_weight"``).
        exclude_first, exclude_last: leave the first / last prunable layer dense.
        layer_sparsity: ``{pattern: sparsity}`` overrides; matching layers are pruned to their
            own ratio and left out of the shared pool.
        **options: method options (see ``prunelab methods``), e.g. ``seed=`` for ``random``.

    Example:
        >>> model = prunelab.models.create("resnet20")
        >>> prunelab.prune(model, "magnitude", sparsity=0.9, exclude_first=True)
    >>> prunelab.prune(model, "l1-filter", speedup=2.0)   # channels removed for real
    """
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"prune needs a torch.nn.Module to prune, got "
                                f"{type(model).__name__}")
    sample = _first_input(example_input, data)
    if sample is not None:
        check_input(model, sample)
    targets = {k: v for k, v in
               (("sparsity", sparsity), ("compression", compression), ("speedup", speedup),
                ("latency", latency_speedup))
               if v is not None}
    if len(targets) > 1:
        raise InvalidValueError(f"give one target, not {' and '.join(targets)}")
    kind, value = next(iter(targets.items())) if targets else ("sparsity", 0.5)
    if isinstance(method, str):
        method = METHODS.get(method).create(**options)
    elif options:
        raise TypeError("options can only be given with a method name, not a method instance")
    measured_on = {}
    if kind == "latency":
        if not isinstance(method, StructuredMethod):
            raise InvalidValueError(
                f"a latency_speedup needs a channel method (channels removed for real, chosen "
                f"by their scores); {method.name!r} is not one. Use a channel method "
                "(prunelab methods), or a speedup (FLOPs) target")
        measured_on = {"backend": backend, "precision": precision}
    elif (backend, precision) != ("torch", "fp32"):
        raise InvalidValueError(f"backend and precision say where a latency_speedup is measured; "
                                f"with a {kind} target they would be ignored (give "
                                "latency_speedup=, or leave them out)")
    selection = LayerSelection(
        include=tuple(include) if include is not None else None,
        exclude=tuple(exclude),
        exclude_first=exclude_first,
        exclude_last=exclude_last,
        layer_sparsity=dict(layer_sparsity or {}),
    )
    with input_errors(model, sample):  # None: inputs the method makes (SynFlow's ones)
        return method.prune(model, value, scope=scope, data=data, selection=selection,
                            target=kind, example_input=example_input, **measured_on)


def _first_input(example_input: torch.Tensor | None, data: Iterable | None) -> Any:
    """The example input, else the inputs of the first batch of ``data`` when it can be read
    twice (a list or a loader; a one-shot iterator is left alone)."""
    if example_input is not None:
        return example_input
    if data is None or iter(data) is data:
        return None
    batch = next(iter(data), None)
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch
