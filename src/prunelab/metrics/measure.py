"""``measure``: size, sparsity, dense and effective FLOPs, per layer, optionally latency."""

from __future__ import annotations

from collections.abc import Sequence
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
from prunelab.metrics.flops import flops_per_module
from prunelab.metrics.latency import Latency, measure_latency
from prunelab.sparsity import PRUNABLE_TYPES
from prunelab.sparsity.masks import layer_type_name
from prunelab.utils import check_input, input_errors


@dataclass(frozen=True)
class LayerStats:
    """One layer that owns parameters: sizes, non-zeros and FLOPs (FLOPs = 2 × MACs)."""

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
    """What :func:`measure` found. FLOPs are 2 × MACs; both are exposed under their own names."""

    params: int
    nonzero_params: int
    flops: int
    effective_flops: int
    layers: list[LayerStats] = field(default_factory=list)
    latency: Latency | None = None

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def effective_macs(self) -> int:
        return self.effective_flops // 2

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that pruning removed (zeros of masked or prunable weights;
        a bias or BatchNorm shift that happens to be 0 was not pruned)."""
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    @property
    def compression(self) -> float:
        """Parameters / non-zero parameters (ShrinkBench's compression ratio)."""
        return self.params / self.nonzero_params if self.nonzero_params else float("inf")

    @property
    def theoretical_speedup(self) -> float:
        """Dense FLOPs / effective FLOPs."""
        return self.flops / self.effective_flops if self.effective_flops else float("inf")

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
        if self.latency is not None:
            out["latency_ms"] = self.latency.median_ms
            out["latency_batch_size"] = self.latency.batch_size
            out["latency_threads"] = self.latency.threads
        return out

    def to_dict(self) -> dict:
        data = self.summary()
        data["layers"] = [asdict(layer) | {"density": layer.density} for layer in self.layers]
        if self.latency is not None:
            data["latency"] = self.latency.to_dict()
        return data


def measure(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    latency: bool = False,
    latency_repeats: int = 30,
    latency_threads: int | None = None,
) -> Measurement:
    """Measure a (possibly pruned) model on ``example_input``.

    Returns params, non-zero params, compression, dense and effective FLOPs (and MACs), a
    per-layer breakdown and, with ``latency=True``, the measured median forward time.

    >>> m = measure(model, torch.randn(1, 3, 32, 32))
    >>> m.macs, m.compression, m.theoretical_speedup
    """
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"measure needs a torch.nn.Module, got {type(model).__name__}")
    first = example_input if isinstance(example_input, torch.Tensor) else None
    if first is not None:
        check_input(model, first)
    params, nonzero = count_parameters(model)
    with input_errors(model, first if first is not None else example_input):
        total_flops, per_module = flops_per_module(model, example_input)
    layers = []
    saved = 0.0
    for name, module in leaf_layers(model):
        tensors = list(effective_tensors(module))
        layer_params = sum(t.numel() for _, t, _ in tensors)
        layer_nonzero = sum(nonzero_count(module, n, t) for n, t, _ in tensors)
        flops = per_module.get(name, 0)
        effective = flops
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE_TYPES) and isinstance(weight, torch.Tensor) and flops:
            density = int(torch.count_nonzero(weight)) / weight.numel()
            effective = round(flops * density)
            saved += flops - effective
        layers.append(
            LayerStats(
                name=name,
                type=layer_type_name(module),
                weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else None,
                params=layer_params,
                nonzero_params=layer_nonzero,
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
        flops=total_flops,
        effective_flops=round(total_flops - saved),
        layers=layers,
        latency=timing,
    )
