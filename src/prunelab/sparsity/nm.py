"""N:M semi-structured sparsity and the input/output layout of a prunable tensor.

An N:M pattern keeps exactly N non-zeros in every group of M *consecutive input weights* of one
output unit, the pattern sparse tensor cores execute (2:4 on NVIDIA Ampere and later). Which
entries are consecutive depends on the tensor:

- Linear and every other 2-D matrix (attention projections, RNN weights): along dim 1, the
  input features of one output row.
- Convolutions, weight ``(out, in/groups, *kernel)``: along the *input channels at one kernel
  position*, as NVIDIA's ASP and the channels-last implicit GEMM of sparse tensor cores group
  them, so ``in_channels / groups`` must be a multiple of M (a first conv over RGB is not;
  exclude it).
- Transposed convolutions, weight ``(in, out/groups, *kernel)``: along dim 0, their input channels.
- Embeddings ``(num_embeddings, dim)`` are treated as matrices (groups along ``dim``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from prunelab.errors import InvalidValueError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None stays None; anything else is refused in one line."""
    if text is None:
        return None
    found = _NM.match(str(text))
    if not found or not 0 < int(found[1]) < int(found[2]):
        raise InvalidValueError(
            f"nm must read 'N:M' with 0 < N < M (e.g. '2:4' keeps 2 of every 4 consecutive "
            f"input weights), got {text!r}")
    return int(found[1]), int(found[2])


def input_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    """The dimension of ``tensor`` (a parameter of ``module``) that runs over its inputs."""
    if tensor.dim() < 2:
        raise InvalidValueError(
            f"N:M sparsity needs a matrix or kernel, got a {tensor.dim()}-D tensor")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 0
    return 1


def output_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    """The dimension of ``tensor`` that runs over output units (a row per output)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) and tensor.dim() > 1 else 0


def _grouped(tensor: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """View ``tensor`` as ``(-1, m)`` groups of ``m`` consecutive entries along ``dim``."""
    return tensor.movedim(dim, -1).reshape(-1, m)


def follows_nm(tensor: torch.Tensor, n: int, m: int, dim: int) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` has at most ``n``
    non-zeros (what an N:M sparse kernel can hold exactly)."""
    if tensor.dim() < 2 or tensor.shape[dim] % m:
        return False
    return bool(((_grouped(tensor, dim, m) != 0).sum(dim=1) <= n).all())


def nm_keep_mask(scores: torch.Tensor, n: int, m: int, dim: int, name: str = "") -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive entries along ``dim``.

    Exactly ``n`` entries per group are kept (ties broken by position, earlier pruned first), so
    an entry scored ``-inf`` (already pruned) is pruned again unless a group has more than
    ``m - n`` of them, where the group keeps ``n`` entries including some of those; the caller
    keeps earlier masks.
    """
    width = scores.shape[dim]
    if width % m:
        where = f"layer {name!r}" if name else "a layer"
        raise InvalidValueError(
            f"N:M sparsity {n}:{m} needs the input width of {where} to be a multiple of {m}, "
            f"but it is {width}; exclude it (exclude=[{name!r}]) or choose another M")
    _check_finite_order(scores)
    groups = _grouped(scores.float(), dim, m)
    order = torch.argsort(groups, dim=1, stable=True)  # stable: ties prune earlier entries
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :m - n], False)
    moved = scores.movedim(dim, -1).shape
    return keep.reshape(moved).movedim(-1, dim)


def row_keep_mask(scores: torch.Tensor, sparsity: float, dim: int) -> torch.Tensor:
    """Prune the same number, ``round(sparsity · row length)``, of lowest scores in every output
    row (rows run along ``dim``); ties are broken by position."""
    _check_finite_order(scores)
    rows = scores.float().movedim(dim, 0).reshape(scores.shape[dim], -1)
    pruned = round(sparsity * rows.shape[1])
    order = torch.argsort(rows, dim=1, stable=True)
    keep = torch.ones_like(rows, dtype=torch.bool)
    keep.scatter_(1, order[:, :pruned], False)
    moved = scores.movedim(dim, 0).shape
    return keep.reshape(moved).movedim(0, dim)


def _check_finite_order(scores: torch.Tensor) -> None:
    if torch.isnan(scores).any():
        raise InvalidValueError("pruning scores contain NaN; check the model and calibration data")
