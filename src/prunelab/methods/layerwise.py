"""Sequential layerwise reconstruction: :class:`ReconstructionMethod` and its shared *how*.

Each selected layer is seen as a matrix problem: a weight matrix W of shape (outputs, inputs)
applied to input columns X. A Linear is already one (its inputs flattened over any leading
dimensions); an attention projection is one per query/key/value part of its rows
(:mod:`prunelab.methods.layer_inputs`); a 2-D convolution becomes one by unfolding its input
patches (``F.unfold``), with
the columns ordered *kernel position major, input channel minor*, so that M consecutive columns
are M input channels at one kernel position, the N:M grouping of :mod:`prunelab.sparsity.nm`.

Layers are pruned in the order the forward pass calls them. For each, the calibration data is
run through the model as pruned so far, a forward pre-hook accumulates the layer's Gram matrix
XXᵀ (float32, on the model's device) and stops the forward there, the method solves, and the
new weights and mask are installed before the next layer is calibrated. Only one layer's Gram
matrix exists at a time; inputs are never stored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import (
    ALL_LAYERS,
    Count,
    LayerSelection,
    Method,
    Positive,
    check_nm,
    override_groups,
)
from prunelab.methods.layer_inputs import PROJECTIONS, InputSource, input_source
from prunelab.sparsity import PrunableWeight
from prunelab.utils import eval_mode, iter_batches


class _Reached(Exception):
    """Raised by the capture hook: the layer's input is recorded, the rest is not needed."""


def unsupported(weight: PrunableWeight) -> str | None:
    """Why a tensor's inputs cannot be turned into columns (None when they can)."""
    module = weight.module
    if weight.shared:
        return "shared by several modules with different inputs"
    if isinstance(module, nn.MultiheadAttention) and weight.param in PROJECTIONS:
        return None
    if weight.param != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{type(module).__name__}.{weight.param}"
    if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or isinstance(module.padding, str)
            or module.padding_mode != "zeros"):
        return (f"Conv2d with groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}")
    return None


def check_layers(weights: list[PrunableWeight], method: str) -> None:
    """Refuse, all at once and by name, tensors whose inputs cannot be turned into columns."""
    bad = [(w.name, why) for w in weights if (why := unsupported(w)) is not None]
    if bad:
        names = [name for name, _ in bad]
        raise InvalidValueError(
            f"{method} reconstructs Linear, MultiheadAttention and ungrouped, zero-padded Conv2d "
            "weights; "
            f"{'; '.join(f'{name!r} is {why}' for name, why in bad)}: exclude "
            f"{'it' if len(bad) == 1 else 'them'} (exclude={names!r}) or use a criterion such as "
            "wanda or magnitude")


def as_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weight as (outputs, inputs) columns in the order of :func:`input_columns`."""
    if isinstance(module, nn.Conv2d):
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight


def from_matrix(module: nn.Module, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_matrix`."""
    if isinstance(module, nn.Conv2d):
        out, channels, kh, kw = like.shape
        return matrix.reshape(out, kh, kw, channels).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(like.shape)


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of a matrix (one row per output position, one column per input
    the weight matrix multiplies)."""
    x = x.detach().float()
    if not isinstance(module, nn.Conv2d):  # a Linear, or an attention projection
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # unbatched
        x = x.unsqueeze(0)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                       padding=module.padding, stride=module.stride)
    batch, _, positions = patches.shape
    kernel = math.prod(module.kernel_size)
    patches = patches.view(batch, module.in_channels, kernel, positions)
    return patches.permute(0, 3, 2, 1).reshape(batch * positions, kernel * module.in_channels)


def block_bounds(cols: int, blocks: int, multiple: int) -> list[tuple[int, int]]:
    """Split ``cols`` inputs into at most ``blocks`` contiguous blocks whose widths are multiples
    of ``multiple`` (an N:M group never straddles two blocks)."""
    width = math.ceil(cols / blocks / multiple) * multiple
    return [(start, min(start + width, cols)) for start in range(0, cols, width)]


def memory_estimate(rows: int, cols: int, blocks: int) -> float:
    """Bytes a solver needs for one layer: the float32 Gram blocks, a float64 copy, its
    Cholesky factor and inverse for one block, and four float32 copies of the weights."""
    block = math.ceil(cols / blocks)
    return 4 * cols * block + 28 * block * block + 16 * rows * cols


def check_memory(weight: PrunableWeight, rows: int, cols: int, method: ReconstructionMethod,
                 multiple: int) -> None:
    """Refuse a layer whose Gram matrix would not fit, saying how many blocks would."""
    need = memory_estimate(rows, cols, method.input_blocks)
    limit = method.max_memory_gb * 2**30
    if need <= limit:
        return
    blocks = method.input_blocks
    while memory_estimate(rows, cols, blocks) > limit and blocks < cols // multiple:
        blocks *= 2
    width = block_bounds(cols, blocks, multiple)[0][1]
    hint = (f"split its inputs into independent blocks with input_blocks={blocks} (≤ {width} "
            f"columns each, about {memory_estimate(rows, cols, blocks) / 2**30:.2g} GiB), "
            if memory_estimate(rows, cols, blocks) <= limit else "")
    raise InvalidValueError(
        f"{method.name} needs about {need / 2**30:.3g} GiB for layer {weight.name!r} ({rows} "
        f"outputs x {cols} inputs, a {cols}x{cols} Hessian), over max_memory_gb="
        f"{method.max_memory_gb}; {hint}raise max_memory_gb, or exclude it "
        f"(exclude=[{weight.name!r}])")


def call_order(model: nn.Module, weights: list[PrunableWeight], data: Iterable,
               limit: int | None) -> list[PrunableWeight]:
    """``weights`` in the order the forward pass first calls their modules (layers the forward
    never calls come last, in module order)."""
    order: dict[int, int] = {}

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            order.setdefault(index, len(order))

        return hook

    handles = [input_source(model, w).module.register_forward_pre_hook(recorder(i))
               for i, w in enumerate(weights)]
    try:
        with eval_mode(model), torch.no_grad():
            x, _ = next(iter_batches(data, model, limit))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    ranked = sorted(range(len(weights)), key=lambda i: order.get(i, len(weights) + i))
    return [weights[i] for i in ranked]


def gram_blocks(model: nn.Module, weight: PrunableWeight, source: InputSource, data: Iterable,
                limit: int | None, bounds: list[tuple[int, int]]
                ) -> list[list[torch.Tensor]] | None:
    """Per segment of the tensor's rows, the diagonal blocks of 2XXᵀ/n for the inputs those rows
    multiply under the current (pruned) model, or None when the forward never reaches them."""
    grams: list[list[torch.Tensor]] = [[] for _ in source.segments]
    seen = [0] * len(source.segments)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for s, segment in enumerate(source.segments):
            columns = input_columns(weight.module, segment.extract(args, kwargs))
            for i, (start, stop) in enumerate(bounds):
                part = columns[:, start:stop]
                block = part.T @ part
                if len(grams[s]) <= i:
                    grams[s].append(block)
                else:
                    grams[s][i] += block
            seen[s] += columns.shape[0]
        raise _Reached

    handle = source.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(model), torch.no_grad():
            for x, _ in iter_batches(data, model, limit):
                with contextlib.suppress(_Reached):
                    model(x)
    finally:
        handle.remove()
    if not seen[0]:
        return None
    return [[2 * g / n for g in blocks] for blocks, n in zip(grams, seen, strict=True)]


def prune_layerwise(method: ReconstructionMethod, model: nn.Module,
                    weights: list[PrunableWeight], targets: dict[str, float],
                    nm: tuple[int, int] | None, data: Iterable) -> None:
    """Solve and install every layer in forward order, each calibrated on the pruned model."""
    check_layers(weights, method.name)
    for weight in weights:
        rows, cols = as_matrix(weight.module, weight.weight).shape
        width = getattr(weight.module, "in_channels", cols)
        if nm is not None and width % nm[1]:
            raise InvalidValueError(
                f"N:M sparsity {nm[0]}:{nm[1]} needs the input width of layer {weight.name!r} "
                f"to be a multiple of {nm[1]}, but it is {width}; exclude it "
                f"(exclude=[{weight.name!r}]) or choose another M")
        check_memory(weight, rows, cols, method, nm[1] if nm else 1)
    for weight in call_order(model, weights, data, method.batches):
        current = weight.weight.detach()
        matrix = as_matrix(weight.module, current).float()
        pruned = as_matrix(weight.module, weight.mask == 0) if weight.mask is not None else (
            torch.zeros_like(matrix, dtype=torch.bool))
        bounds = block_bounds(matrix.shape[1], method.input_blocks, nm[1] if nm else 1)
        source = input_source(model, weight)
        grams = gram_blocks(model, weight, source, data, method.batches, bounds)
        if grams is None:
            raise InvalidValueError(
                f"{method.name}: the forward pass never reached layer {weight.name!r}, so it has "
                f"no calibration inputs; exclude it (exclude=[{weight.name!r}])")
        keep = torch.ones_like(matrix, dtype=torch.bool)
        new = matrix.clone()
        sparsity = targets[weight.name]
        for segment, blocks in zip(source.segments, grams, strict=True):
            rows = slice(segment.start, segment.stop)
            for (start, stop), gram in zip(bounds, blocks, strict=True):
                try:
                    keep[rows, start:stop], new[rows, start:stop] = method.solve(
                        matrix[rows, start:stop], gram, sparsity, nm, pruned[rows, start:stop])
                except InvalidValueError as error:
                    raise InvalidValueError(
                        f"{method.name}, layer {weight.name!r}: {error}") from None
        with torch.no_grad():
            original = weight.original
            original.copy_(from_matrix(weight.module, new * keep, current).to(original.dtype))
        weight.set_mask(from_matrix(weight.module, keep, current))


@dataclass
class ReconstructionMethod(Method):
    """A layerwise solver: prunes each layer *and rewrites its kept weights* (OBS, SparseGPT).

    Such a method minimises the layer's reconstruction error ‖WX − ŴX‖² over its calibration
    inputs X, whose sufficient statistic is the Gram matrix H = 2XXᵀ/n (convolutions unfolded).
    The *what* is :meth:`solve` (a weight matrix and its H -> a keep mask and new weights); the
    *how* is shared here and in :mod:`prunelab.methods.layerwise`: layers are visited in the order
    the forward pass calls them, and each layer's H is collected from the model *as already
    pruned*, so later layers learn to compensate for what earlier ones lost (sequential
    calibration). The comparison is within a layer, so ``scope`` has no effect: every layer gets
    the target sparsity (``layer_sparsity`` overrides apply). Options shared by all solvers:
    ``nm`` (N:M pattern), ``batches`` (calibration batches used), ``input_blocks`` (split a wide
    layer's inputs into independent blocks, a block-diagonal H, to bound memory) and
    ``max_memory_gb`` (refuse a layer whose H would need more).
    """

    needs_data = True
    nm: str | None = None
    batches: Count | None = None
    input_blocks: Count = 1
    max_memory_gb: Positive = 8.0

    def solve(
        self, weight: torch.Tensor, gram: torch.Tensor, sparsity: float,
        nm: tuple[int, int] | None, pruned: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep mask and new weights for one ``(rows, cols)`` float32 weight matrix, given its
        ``(cols, cols)`` Gram matrix; ``pruned`` marks entries that must stay zero."""
        raise NotImplementedError

    def prune(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        scope: str = "global",
        data: Iterable | None = None,
        selection: LayerSelection = ALL_LAYERS,
        target: str = "sparsity",
        example_input: torch.Tensor | None = None,
    ) -> nn.Module:
        pattern = check_nm(self.nm, sparsity, target, selection)
        sparsity = self._requested_sparsity(model, sparsity, target, scope, data, selection,
                                            example_input)
        weights = selection.weights(model)
        targets = {}
        for group, value in override_groups([(w, torch.empty(0)) for w in weights],
                                    selection.layer_sparsity):
            for weight, _ in group:
                targets[weight.name] = sparsity if value is None else value
        prune_layerwise(self, model, weights, targets, pattern, data)
        return model
