"""Input statistics for methods that weigh weights by the activations they multiply.

For a prunable tensor, :func:`input_observer` says which module input the tensor multiplies and
how an input feature maps onto the tensor's entries: a Linear's column j multiplies input feature
j, a convolution's kernels multiply input channels, an Embedding's row j multiplies the one-hot
feature "token j" (so its norm over n lookups is √(count of j)), an attention's fused in-projection
reads the query with its first third of rows, the key with the second and the value with the last,
and an RNN's first-layer ``weight_ih`` reads the input sequence. Where the input is internal to the
module (an RNN's recurrent state, its deeper layers), there is nothing to observe and the caller
gets a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from prunelab.errors import InvalidValueError
from prunelab.methods.layer_inputs import projection_source
from prunelab.sparsity import PrunableWeight

#: ``(args, kwargs)`` of the module's forward -> (sum of squares per input feature, rows seen).
Collect = Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor | int]]
#: Per-feature RMS -> a tensor of the parameter's shape.
Spread = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InputObserver:
    """How to observe the input a prunable tensor multiplies, and map it onto the tensor."""

    collect: Collect
    spread: Spread


def input_channel_sq_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a layer's input per input feature/channel (summed over batch, space)."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return x.pow(2).reshape(-1, x.shape[-1]).sum(0)
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    return x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)


def per_weight_input_norm(module: nn.Module, channel_norms: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel norm to the layer's weight shape (groups handled)."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return channel_norms.unsqueeze(0).expand_as(weight)
    kernel = [1] * len(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight: (in, out/groups, *k); the input channel is dim 0.
        return channel_norms.view(-1, 1, *kernel).expand_as(weight)
    groups = module.groups
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    per_group = channel_norms.view(groups, 1, in_per_group)
    per_out = per_group.expand(groups, out_channels // groups, in_per_group)
    return per_out.reshape(out_channels, in_per_group, *kernel).expand_as(weight)


def _features(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Sum of squares per feature of the last dimension, and the number of rows."""
    rows = x.detach().float().reshape(-1, size)
    return rows.pow(2).sum(0), rows.shape[0]


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> torch.Tensor:
    return args[index] if len(args) > index else kwargs[name]


def _layer(module: nn.Module) -> InputObserver:
    def collect(args: tuple, kwargs: dict):
        sums = input_channel_sq_sums(module, args[0])
        return sums, args[0].numel() // sums.numel()

    return InputObserver(collect, lambda rms: per_weight_input_norm(module, rms))


def _embedding(module: nn.Embedding) -> InputObserver:
    def collect(args: tuple, kwargs: dict):
        tokens = _argument(args, kwargs, 0, "input").reshape(-1)
        counts = torch.bincount(tokens, minlength=module.num_embeddings).float()
        return counts, tokens.numel()  # a one-hot input: its square is itself

    return InputObserver(collect, lambda rms: rms.unsqueeze(1).expand_as(module.weight))


def _attention(module: nn.MultiheadAttention, param: str) -> InputObserver:
    segments = projection_source(module, param).segments  # type: ignore[union-attr]
    weight = getattr(module, param)
    width = weight.shape[1]

    def collect(args: tuple, kwargs: dict):
        sums, rows = [], []
        for segment in segments:
            s, n = _features(segment.extract(args, kwargs), width)
            sums.append(s)
            rows.append(torch.full_like(s, n))
        return torch.cat(sums), torch.cat(rows)

    def spread(rms: torch.Tensor) -> torch.Tensor:
        blocks = rms.view(len(segments), 1, width)  # each block of rows reads its own input
        rows_per_block = weight.shape[0] // len(segments)
        return blocks.expand(len(segments), rows_per_block, width).reshape(weight.shape)

    return InputObserver(collect, spread)


def _rnn_input(module: nn.RNNBase, param: str) -> InputObserver:
    weight = getattr(module, param)

    def collect(args: tuple, kwargs: dict):
        x = _argument(args, kwargs, 0, "input")
        return _features(x.data if isinstance(x, PackedSequence) else x, module.input_size)

    return InputObserver(collect, lambda rms: rms.unsqueeze(0).expand_as(weight))


#: Observers of custom layer types: ``type -> (module, parameter name) -> InputObserver``.
_OBSERVERS: dict[type[nn.Module], Callable[[nn.Module, str], InputObserver]] = {}


def register_input_observer(module_type: type[nn.Module],
                            factory: Callable[[nn.Module, str], InputObserver]) -> None:
    """Say how to observe the input of a custom layer type's prunable tensors (e.g. the
    transposed ``Conv1D`` of Hugging Face's GPT-2); the most specific registered class wins."""
    _OBSERVERS[module_type] = factory


def features_observer(module: nn.Module, param: str, dim: int) -> InputObserver:
    """An observer for a tensor whose dimension ``dim`` indexes the features of the last
    dimension of the module's first input (``dim=1`` for a Linear, ``0`` for a transposed
    one)."""
    weight = getattr(module, param)
    size = weight.shape[dim]

    def collect(args: tuple, kwargs: dict):
        return _features(args[0], size)

    def spread(rms: torch.Tensor) -> torch.Tensor:
        return rms.unsqueeze(1 - dim).expand_as(weight)

    return InputObserver(collect, spread)


def input_observer(weight: PrunableWeight, method: str = "activation") -> InputObserver:
    """The observer for ``weight``; a clear error where its input cannot be observed."""
    module, param = weight.module, weight.param
    if weight.shared:
        raise InvalidValueError(
            f"{method} cannot score {weight.name!r}: the tensor is shared with "
            f"{', '.join(repr(n) for n in weight.names[1:])}, which multiply different inputs; "
            f"exclude it (exclude=[{weight.name!r}]) or use another criterion (magnitude, taylor)")
    custom = next((_OBSERVERS[c] for c in type(module).__mro__ if c in _OBSERVERS), None)
    if custom is not None:
        return custom(module, param)
    if param == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return _layer(module)
    if (param == "weight" and isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward):
        return _embedding(module)
    if isinstance(module, nn.MultiheadAttention) and param.endswith("proj_weight"):
        return _attention(module, param)
    if isinstance(module, nn.RNNBase) and param in ("weight_ih_l0", "weight_ih_l0_reverse"):
        return _rnn_input(module, param)
    if isinstance(module, nn.Embedding):  # a subclass whose forward does not take the ids
        reason = (f"{type(module).__name__} computes the rows it looks up inside its forward "
                  "(positions from a mask, say)")
    elif isinstance(module, nn.RNNBase):
        what = "the recurrent state" if param.startswith("weight_hh") else (
            "the output of the layer below" if param.startswith("weight_ih") else "the cell output")
        reason = f"it multiplies {what}, computed inside {type(module).__name__}"
    else:
        reason = f"it does not know which input {type(module).__name__}.{param} multiplies"
    raise InvalidValueError(
        f"{method} cannot score {weight.name!r}: {reason}; exclude it "
        f"(exclude=[{weight.name!r}]) or use another criterion (magnitude, taylor)")
