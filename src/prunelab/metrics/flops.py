"""FLOPs from :mod:`torch.utils.flop_counter`, dense and effective.

Conventions, stated once: a **MAC** is one multiply-accumulate; **FLOPs = 2 × MACs**, the unit
``torch.utils.flop_counter`` reports. Only matrix products, convolutions and attention are counted
(what every published FLOP table counts); activations, normalisation and pooling are not.

*Effective* FLOPs are counted per operation: an operation that multiplies by a model parameter (a
weight, possibly masked) costs its FLOPs × the fraction of that operand that is non-zero. With
unstructured sparsity every entry of a weight takes part in the same number of MACs, so this is
exactly the work left when zero weights are skipped, for any parameter (a Linear's weight, an
attention's fused in-projection, a tied embedding used as the output layer) and for layers with
several weights. Operations with no parameter operand (attention's score and value products)
count dense.

The forward is routed through kernels the counter can see: ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` have eval-mode fast paths that run as one fused operation, and
LSTMs run as one fused mkldnn (CPU) or cuDNN (GPU) operation per layer; both are switched off while
counting, and CPU flash attention gets torch's attention formula.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from prunelab.metrics.counting import effective_tensors, leaf_layers
from prunelab.utils import eval_mode

aten = torch.ops.aten

#: Kernels torch's counter has no formula for (raw-argument formulas, like flop_registry's).
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[
        aten._scaled_dot_product_flash_attention],
}
#: Arguments that are multiplied, for counted operations that also take added or option tensors
#: (``addmm``'s bias); an operation not listed multiplies all its tensor arguments.
_MULTIPLIED = {
    aten.addmm: (1, 2),
    aten.baddbmm: (1, 2),
    aten.convolution: (0, 1),
    aten._convolution: (0, 1),
    aten.cudnn_convolution: (0, 1),
    aten.convolution_overrideable: (0, 1),
    aten._slow_conv2d_forward: (0, 1),
}


def as_inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    return tuple(example_input)


@contextlib.contextmanager
def countable_kernels(model: nn.Module) -> Iterator[None]:
    """Switch off the fused kernels the FLOP counter cannot see into (see the module docstring)."""
    backends = torch.backends
    saved = (backends.mha.get_fastpath_enabled(), backends.mkldnn.enabled, backends.cudnn.enabled)
    rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    backends.mha.set_fastpath_enabled(False)
    if rnn:
        backends.mkldnn.enabled = backends.cudnn.enabled = False
    try:
        yield
    finally:
        backends.mha.set_fastpath_enabled(saved[0])
        backends.mkldnn.enabled, backends.cudnn.enabled = saved[1], saved[2]


def _module_name(tracker_name: str) -> str:
    """Qualified name from a ``ModuleTracker`` name (``ResNet.layer1.0`` -> ``layer1.0``)."""
    return tracker_name.split(".", 1)[1] if "." in tracker_name else ""


@dataclass(frozen=True)
class FlopCount:
    """One forward's FLOPs: dense and effective totals, and per layer.

    ``per_module`` holds each module's FLOPs including its children (the root is ``""``).
    ``layers`` attributes every counted operation to one layer, ``{name: (flops, effective)}``:
    the layer whose parameter it multiplies (an attention's ``out_proj``, although that module is
    never called), else the innermost module running.
    """

    flops: int
    effective_flops: int
    per_module: dict[str, int]
    layers: dict[str, tuple[int, int]]


class _Counter(FlopCounterMode):
    """``FlopCounterMode`` whose formulas also record effective FLOPs and the owning layer."""

    def __init__(self, parameters: dict[int, list[str]]):
        self.parameters = parameters  # storage address -> names of the modules holding it
        self.layers: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        formulas = {**flop_registry, **_EXTRA_FORMULAS}
        super().__init__(display=False, custom_mapping={
            op: self._recording(op, formula) for op, formula in formulas.items()})

    def _recording(self, op, formula):
        def counted(*args, out_val=None, **kwargs) -> int:
            flops = formula(*args, out_val=out_val, **kwargs)
            self._record(op, args, flops)
            return flops

        counted._get_raw = True  # receives tensors, as flop_registry's formulas do
        return counted

    def _record(self, op, args: tuple, flops: int) -> None:
        positions = _MULTIPLIED.get(op, range(len(args)))
        owners, density = None, 1.0
        for i in positions:
            tensor = args[i] if i < len(args) else None
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            holders = self.parameters.get(_storage(tensor))
            if holders and tensor.numel():
                owners = owners or holders
                density = min(density, int(torch.count_nonzero(tensor)) / tensor.numel())
        active = [n for n in self.mod_tracker.parents if n != "Global"]
        innermost = _module_name(max(active, key=lambda n: n.count("."))) if active else ""
        layer = innermost if owners is None or innermost in owners else owners[0]
        self.layers[layer][0] += flops
        self.layers[layer][1] += flops * density


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def count_flops(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> FlopCount:
    """Dense and effective FLOPs of one forward of ``model`` on ``example_input``, per layer.

    Masked parameters are evaluated once (``parametrize.cached``), so the operations see the
    masked tensors and their zeros count. Works on any device; on the meta device effective FLOPs
    equal dense FLOPs (there are no values to look at).
    """
    with eval_mode(model), torch.no_grad(), parametrize.cached(), countable_kernels(model):
        parameters: dict[int, list[str]] = defaultdict(list)
        for name, module in leaf_layers(model):
            for _, tensor, _ in effective_tensors(module):  # a masked weight: the cached product
                if tensor.device.type != "meta" and tensor.numel():
                    parameters[_storage(tensor)].append(name)
        counter = _Counter(dict(parameters))
        with counter:
            model(*as_inputs(example_input))
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key != "Global":
            name = _module_name(key)
            per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    return FlopCount(
        flops=int(counter.get_total_flops()),
        effective_flops=round(sum(effective for _, effective in counter.layers.values())),
        per_module=per_module,
        layers={name: (int(f), round(e)) for name, (f, e) in counter.layers.items()},
    )


def flops_per_module(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward, and FLOPs attributed to each module (by qualified name).

    A module's count includes its children; the root is named ``""``.
    """
    count = count_flops(model, example_input)
    return count.flops, count.per_module
