"""Exact, deterministic selection of the k lowest scores."""

from __future__ import annotations

import torch

from prunelab.errors import InvalidValueError


def keep_mask_from_scores(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Boolean mask of ``scores.shape`` that drops exactly the ``num_pruned`` lowest scores.

    Ties at the threshold are broken by position (earlier entries are pruned first), so the count
    is exact and the result does not depend on the sort algorithm.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= num_pruned <= n:
        raise InvalidValueError(f"cannot prune {num_pruned} of {n} entries")
    if num_pruned == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(flat).any():
        raise InvalidValueError("pruning scores contain NaN; check the model and calibration data")
    threshold = torch.kthvalue(flat, num_pruned).values
    keep = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    ties_to_prune = num_pruned - int((flat < threshold).sum())
    keep[ties[ties_to_prune:]] = True
    return keep.view_as(scores)
