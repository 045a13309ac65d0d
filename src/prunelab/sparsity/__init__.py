"""Masks on weights and sparsity accounting."""

from prunelab.sparsity.masks import (
    PRUNABLE_TYPES,
    PrunableWeight,
    WeightMask,
    check_sparsity,
    get_mask,
    make_permanent,
    mask_sparsity,
    masked_modules,
    original_weight,
    prepare_for_state_dict,
    prunable_weights,
    remove_masks,
    set_mask,
    sparsity_for_compression,
)
from prunelab.sparsity.select import keep_mask_from_scores

__all__ = [
    "PRUNABLE_TYPES",
    "PrunableWeight",
    "WeightMask",
    "check_sparsity",
    "get_mask",
    "keep_mask_from_scores",
    "make_permanent",
    "mask_sparsity",
    "masked_modules",
    "original_weight",
    "prepare_for_state_dict",
    "prunable_weights",
    "remove_masks",
    "set_mask",
    "sparsity_for_compression",
]
