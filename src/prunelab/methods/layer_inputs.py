"""What a layerwise solver calibrates on: the inputs each row of a prunable tensor multiplies.

A Linear or Conv2d weight multiplies its module's input. The tensors of
:class:`torch.nn.MultiheadAttention` do not fit that: the fused ``in_proj_weight`` stacks the
query, key and value projections, whose rows multiply three different inputs (the same tensor
in self-attention, not in cross-attention), and ``out_proj``'s forward is never called (the
attention function reads its weight directly), so its input, the heads' concatenated outputs,
is never seen by a hook on it. Here each tensor becomes *segments*: a range of its rows and how
to get the input those rows multiply from the arguments of one module's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.sparsity import PrunableWeight

Extract = Callable[[tuple, dict], torch.Tensor]
#: The attention tensors whose rows are projections of the query, key and value.
PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: MultiheadAttention.forward's parameters, in order (arguments may come by position).
ATTENTION_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                  "average_attn_weights", "is_causal")


def _call(args: tuple, kwargs: dict) -> dict:
    return dict(zip(ATTENTION_ARGS, args, strict=False)) | kwargs


@dataclass
class Segment:
    """Rows ``start:stop`` of a tensor multiply the input that ``extract`` gets from the
    ``(args, kwargs)`` of a forward call of the source module."""

    start: int
    stop: int
    extract: Extract


@dataclass
class InputSource:
    """Where to hook (``module``) and the segments of the tensor's rows."""

    module: nn.Module
    segments: list[Segment]


def input_source(model: nn.Module, weight: PrunableWeight) -> InputSource | None:
    """How to calibrate ``weight``, or None when its inputs cannot be told."""
    module, rows = weight.module, weight.weight.shape[0]
    if isinstance(module, nn.MultiheadAttention):
        return projection_source(module, weight.param)
    if weight.param != "weight":
        return None
    parent = _attention_owning(model, module)
    if parent is not None:  # out_proj: the attention output before it
        return InputSource(parent, [Segment(0, rows, _attention_values(parent))])
    return InputSource(module, [Segment(0, rows, lambda args, kwargs: args[0])])


def projection_source(attention: nn.MultiheadAttention, param: str) -> InputSource | None:
    """The query/key/value parts of an attention projection ``param`` (None for another)."""
    if param == "in_proj_weight":
        e = attention.embed_dim
        return InputSource(attention, [Segment(i * e, (i + 1) * e, _argument(i))
                                       for i in range(3)])
    for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
        if param == name:
            rows = getattr(attention, name).shape[0]
            return InputSource(attention, [Segment(0, rows, _argument(i))])
    return None


def _argument(index: int) -> Extract:
    """The query (0), key (1) or value (2) of a MultiheadAttention call."""

    def extract(args: tuple, kwargs: dict) -> torch.Tensor:
        return _call(args, kwargs)[ATTENTION_ARGS[index]]

    return extract


def _attention_owning(model: nn.Module, module: nn.Module) -> nn.MultiheadAttention | None:
    for candidate in model.modules():
        if isinstance(candidate, nn.MultiheadAttention) and candidate.out_proj is module:
            return candidate
    return None


def _attention_values(attention: nn.MultiheadAttention) -> Extract:
    """The heads' concatenated outputs (``out_proj``'s input), recomputed from the call's
    arguments with an identity output projection."""

    def extract(args: tuple, kwargs: dict) -> torch.Tensor:
        call = _call(args, kwargs)
        q, k, v = (call[name] for name in ATTENTION_ARGS[:3])
        if attention.batch_first:
            q, k, v = (t.transpose(-3, -2) if t.dim() == 3 else t for t in (q, k, v))
        e = attention.embed_dim
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        separate = not attention._qkv_same_embed_dim
        out, _ = F.multi_head_attention_forward(
            q, k, v, e, attention.num_heads, attention.in_proj_weight, attention.in_proj_bias,
            attention.bias_k, attention.bias_v, attention.add_zero_attn, 0.0, eye,
            torch.zeros(e, dtype=q.dtype, device=q.device), training=False,
            key_padding_mask=call.get("key_padding_mask"), need_weights=False,
            attn_mask=call.get("attn_mask"), use_separate_proj_weight=separate,
            q_proj_weight=attention.q_proj_weight, k_proj_weight=attention.k_proj_weight,
            v_proj_weight=attention.v_proj_weight, is_causal=call.get("is_causal", False))
        return out

    return extract
