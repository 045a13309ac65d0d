"""Masks on weights, which parameters are prunable, and sparsity accounting."""

from prunelab.sparsity.masks import (
    WeightMask,
    check_sparsity,
    get_mask,
    make_permanent,
    mask_sparsity,
    masked_modules,
    masked_parameters,
    original_weight,
    prepare_for_state_dict,
    remove_masks,
    set_mask,
)
from prunelab.sparsity.prunable import (
    PrunableWeight,
    check_not_cut,
    collapsed_layers,
    prunable_parameter_names,
    prunable_weights,
    register_prunable,
    signal_passes,
    sparsity_for_compression,
)
from prunelab.sparsity.select import keep_mask_from_scores

__all__ = [
    "PrunableWeight",
    "WeightMask",
    "check_not_cut",
    "check_sparsity",
    "collapsed_layers",
    "get_mask",
    "keep_mask_from_scores",
    "make_permanent",
    "mask_sparsity",
    "masked_modules",
    "masked_parameters",
    "original_weight",
    "prepare_for_state_dict",
    "prunable_parameter_names",
    "prunable_weights",
    "register_prunable",
    "remove_masks",
    "set_mask",
    "signal_passes",
    "sparsity_for_compression",
]
