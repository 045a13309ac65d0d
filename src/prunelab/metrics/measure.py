"""``measure``: size, sparsity, dense and effective FLOPs, per layer, optionally latency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.metrics.counting import (
    count_parameters,
    effective_tensors,
    leaf_layers,
    nonzero_count,
)
from prunelab.metrics.flops import count_flops
from prunelab.metrics.latency import Latency, measure_latency
from prunelab.sparsity.masks import layer_type_name
from prunelab.utils import check_input, input_errors


@dataclass(frozen=True)
class LayerStats:
    """One layer that owns parameters: sizes, non-zeros and FLOPs (FLOPs = 2 × MACs).

    A layer's FLOPs are those of the operations that multiply its parameters, plus those that
    run inside it and multiply no parameter (an attention's score products).
    """

    name: str
    type: str
    weight_shape: tuple[int, ...] | None
    params: int
    nonzero_params: int
    flops: int
    effective_flops: int

    @property
    def density(self) -> float:
        return self.nonzero_params / self.params if self.params else 1.0


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found. FLOPs are 2 × MACs; both are exposed under their own names.

    With a reference (the original model, see :func:`measure`), compression, sparsity and the
    speed-ups compare with the reference's parameters, FLOPs and latency instead of this model's
    own dense counts: what a model that lost channels needs.
    """

    params: int
    nonzero_params: int
    flops: int
    effective_flops: int
    layers: list[LayerStats] = field(default_factory=list)
    latency: Latency | None = None
    reference_params: int | None = None
    reference_flops: int | None = None
    reference_latency_ms: float | None = None
    #: Tokens in the example input when it is token ids (a language model), else None.
    tokens: int | None = None

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def effective_macs(self) -> int:
        return self.effective_flops // 2

    @property
    def baseline_params(self) -> int:
        """The parameter count ratios compare with: the reference's, else this model's."""
        return self.params if self.reference_params is None else self.reference_params

    @property
    def baseline_flops(self) -> int:
        """The FLOPs speed-ups compare with: the reference's, else this model's dense FLOPs."""
        return self.flops if self.reference_flops is None else self.reference_flops

    @property
    def sparsity(self) -> float:
        """Fraction of the (reference's) parameters that pruning removed: zeros of masked or
        prunable weights, or gone (a bias or BatchNorm shift that happens to be 0 was not
        pruned)."""
        base = self.baseline_params
        return 1.0 - self.nonzero_params / base if base else 0.0

    @property
    def compression(self) -> float:
        """(Reference) parameters / non-zero parameters (ShrinkBench's compression ratio)."""
        return self.baseline_params / self.nonzero_params if self.nonzero_params else float("inf")

    @property
    def theoretical_speedup(self) -> float:
        """(Reference) dense FLOPs / effective FLOPs."""
        return self.baseline_flops / self.effective_flops if self.effective_flops else float("inf")

    @property
    def measured_speedup(self) -> float | None:
        """Reference latency / latency, when both were measured."""
        if self.latency is None or self.reference_latency_ms is None:
            return None
        return self.reference_latency_ms / self.latency.median_ms

    def summary(self) -> dict[str, float | int]:
        """Flat dict of the headline numbers (for tables, JSON and CSV)."""
        out: dict[str, float | int] = {
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "flops": self.flops,
            "macs": self.macs,
            "effective_flops": self.effective_flops,
            "effective_macs": self.effective_macs,
            "theoretical_speedup": self.theoretical_speedup,
        }
        if self.tokens:
            out["macs_per_token"] = self.macs / self.tokens
            out["effective_macs_per_token"] = self.effective_macs / self.tokens
        if self.reference_params is not None:
            out["reference_params"] = self.reference_params
            out["reference_flops"] = self.baseline_flops
        if self.latency is not None:
            out["latency_ms"] = self.latency.median_ms
            out["latency_batch_size"] = self.latency.batch_size
            out["latency_threads"] = self.latency.threads
        if self.measured_speedup is not None:
            out["measured_speedup"] = self.measured_speedup
        return out

    def to_dict(self) -> dict:
        data = self.summary()
        data["layers"] = [asdict(layer) | {"density": layer.density} for layer in self.layers]
        if self.latency is not None:
            data["latency"] = self.latency.to_dict()
        return data


Reference = nn.Module | Measurement | Mapping


def measure(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    latency: bool = False,
    latency_repeats: int = 30,
    latency_threads: int | None = None,
    reference: Reference | None = None,
) -> Measurement:
    """Measure a (possibly pruned) model on ``example_input``.

    Returns params, non-zero params, compression, dense and effective FLOPs (and MACs), for a
    language model (token ids ``(batch, length)`` as input) MACs per token (attention included:
    each token's share of the whole sequence's MACs), a per-layer breakdown and, with
    ``latency=True``, the measured median forward time.

    ``reference`` is the model this one was pruned from (a module, measured here on the same input,
    its latency too when ``latency=True``), or its :class:`Measurement`, or a dict with ``params``
    and ``flops`` (and optionally ``latency_ms``), such as ``Measurement.summary()`` or a result
    row. Compression, sparsity and the speed-ups are then relative to it: a model whose channels
    were removed has no zeros, and only the original shows what it saves.

    >>> m = measure(model, torch.randn(1, 3, 32, 32))
    >>> m.macs, m.compression, m.theoretical_speedup
    >>> measure(smaller, x, reference=original).theoretical_speedup  # after structured pruning
    """
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"measure needs a torch.nn.Module, got {type(model).__name__}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise InvalidValueError(
            "measure needs the model's weights, but it is on the meta device; for its dense FLOPs "
            "use prunelab.metrics.count_flops")
    first = example_input if isinstance(example_input, torch.Tensor) else None
    if first is not None:
        check_input(model, first)
    base = _reference(reference, example_input, latency, latency_repeats, latency_threads)
    params, nonzero = count_parameters(model)
    with input_errors(model, first if first is not None else example_input):
        count = count_flops(model, example_input)
    layers = []
    for name, module in leaf_layers(model):
        tensors = list(effective_tensors(module))
        weight = getattr(module, "weight", None)
        flops, effective = count.layers.get(name, (0, 0))
        layers.append(
            LayerStats(
                name=name,
                type=layer_type_name(module),
                weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else None,
                params=sum(t.numel() for _, t, _ in tensors),
                nonzero_params=sum(nonzero_count(module, n, t) for n, t, _ in tensors),
                flops=flops,
                effective_flops=effective,
            )
        )
    timing = (
        measure_latency(model, example_input, repeats=latency_repeats, threads=latency_threads)
        if latency
        else None
    )
    return Measurement(
        params=params,
        nonzero_params=nonzero,
        flops=count.flops,
        effective_flops=count.effective_flops,
        layers=layers,
        latency=timing,
        tokens=first.numel() if first is not None and _is_token_ids(first) else None,
        **base,
    )


def _is_token_ids(x: torch.Tensor) -> bool:
    """Integer ``(batch, length)`` input: token ids of a language model."""
    return x.dim() == 2 and not x.dtype.is_floating_point and not x.dtype.is_complex


def _reference(reference: Reference | None, example_input, latency: bool, repeats: int,
               threads: int | None) -> dict:
    """The reference's params, FLOPs and latency as ``Measurement`` fields."""
    if reference is None:
        return {}
    if isinstance(reference, nn.Module):
        reference = measure(reference, example_input, latency=latency, latency_repeats=repeats,
                            latency_threads=threads)
    if isinstance(reference, Measurement):
        return {"reference_params": reference.params, "reference_flops": reference.flops,
                "reference_latency_ms": reference.latency.median_ms if reference.latency else None}
    if isinstance(reference, Mapping) and {"params", "flops"} <= set(reference):
        return {"reference_params": int(reference["params"]),
                "reference_flops": int(reference["flops"]),
                "reference_latency_ms": reference.get("latency_ms")}
    raise InvalidValueError(
        "reference must be the original model, its Measurement, or a dict with 'params' and "
        f"'flops'; got {type(reference).__name__}")
