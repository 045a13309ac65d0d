"""OBS with SparseGPT's lazy blocked updates (Hassibi 1993, Frantar & Alistarh 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.errors import InvalidValueError
from prunelab.methods.base import Count, NonNegative, register_method
from prunelab.methods.layerwise import ReconstructionMethod
from prunelab.sparsity import keep_mask_from_scores
from prunelab.sparsity.nm import nm_keep_mask


@register_method("sparsegpt")
@dataclass
class SparseGPT(ReconstructionMethod):
    """OBS / SparseGPT: prune each layer by saliency w²/[H⁻¹]_qq and update the remaining weights.

    Layerwise Optimal Brain Surgeon on H = 2XXᵀ/n from the layer's calibration inputs (the
    Hessian of ‖WX − ŴX‖²), dampened by ``damp`` × its mean diagonal. Columns are eliminated left
    to right: pruning weight q of a row moves the error onto the row's not-yet-processed weights
    by the OBS update δw = −w_q/[H_F⁻¹]_qq · H_F⁻¹[:, q], where F are the columns not yet
    processed. All H_F⁻¹ rows needed are the rows of one upper Cholesky factor of H⁻¹ (computed in
    float64), and updates are applied to a block of ``blocksize`` columns at a time and to the
    rest of the matrix once per block (SparseGPT's lazy batch updates), which makes a 4096-wide
    layer take seconds. The mask is chosen per block by the same saliency (adaptive mask
    selection; the exact target count overall), or with ``nm`` per N:M group when the group's
    first column is reached. Layers are pruned sequentially on the already-pruned model (see
    ``ReconstructionMethod``). Linear and Conv2d layers and MultiheadAttention's projections: the
    query, key and value rows of ``in_proj_weight`` are each solved on their own input, and
    ``out_proj`` on the heads' outputs (recomputed, as torch never calls its forward). Needs
    unlabelled calibration batches.
    """

    blocksize: Count = 128
    damp: NonNegative = 0.01

    def solve(
        self, weight: torch.Tensor, gram: torch.Tensor, sparsity: float,
        nm: tuple[int, int] | None, pruned: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return obs_solve(weight, gram, sparsity, nm=nm, pruned=pruned,
                         blocksize=self.blocksize, damp=self.damp)


def inverse_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = ``damp`` × mean diagonal, in float64.

    Row q of U divided by U_qq is H_F⁻¹[q, F] / [H_F⁻¹]_qq for F = the columns from q on, and
    U_qq² = [H_F⁻¹]_qq: everything the left-to-right elimination needs.
    """
    h = gram.double().clone()
    mean = h.diagonal().mean()
    h.diagonal().add_(damp * mean if mean > 0 else 1.0)
    factor, info = torch.linalg.cholesky_ex(h)
    if info:
        raise InvalidValueError(
            f"the Hessian is not positive definite even with damp={damp}; raise damp")
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True)


def obs_solve(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, *,
    nm: tuple[int, int] | None = None, pruned: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, blocksize: Count = 128, damp: NonNegative = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask and OBS-updated weights of a ``(rows, cols)`` matrix with Gram matrix ``gram``.

    ``mask`` (1 = keep) fixes the mask and only computes the update; ``pruned`` marks entries that
    must be pruned. Returns float32 tensors on ``weight``'s device.
    """
    if blocksize < 1 or (nm is not None and blocksize % nm[1]):
        raise InvalidValueError(
            f"blocksize must be a positive multiple of M, got {blocksize}"
            + (f" with nm={nm[0]}:{nm[1]}" if nm else ""))
    if damp < 0:
        raise InvalidValueError(f"damp must be >= 0, got {damp}")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    u = inverse_cholesky(gram.to(w.device), damp).float()
    forced = torch.zeros_like(w, dtype=torch.bool) if pruned is None else pruned.bool()
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool() & ~forced
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block, factor = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.zeros_like(block)
        diag = factor.diagonal()
        if mask is None and nm is None:  # adaptive mask selection for the whole block
            count = round(sparsity * rows * stop) - round(sparsity * rows * start)
            keep[:, start:stop] = keep_mask_from_scores(
                _saliency(block, diag, forced[:, start:stop]), count) & ~forced[:, start:stop]
        for j in range(stop - start):
            if mask is None and nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                columns = slice(start + j, start + j + nm[1])
                keep[:, columns] = nm_keep_mask(
                    _saliency(block[:, group], diag[group], forced[:, columns]),
                    *nm, dim=1) & ~forced[:, columns]
            column = block[:, j]
            error = (column * ~keep[:, start + j]) / factor[j, j]
            block[:, j:] -= error.unsqueeze(1) * factor[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return keep, w * keep


def _saliency(block: torch.Tensor, diag: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """OBS saliency w²/[H_F⁻¹]_qq (= w²/U_qq²); entries that must go score −∞."""
    score = block.pow(2) / diag.pow(2).unsqueeze(0)
    return score.masked_fill(forced, float("-inf"))
