"""Exporting one width of a supernet as a plain, physically narrow model.

The supernet is copied, its layers made plain again (original classes, one BatchNorm per layer
holding the values of the chosen width), and the inactive channels of every group are removed
with the structured pruning machinery (:func:`prunelab.structured.graph.apply_plan`). So the
result is the original architecture with fewer channels, with no hooks or parametrizations, and
it records its removals like any structurally pruned model: ``save_checkpoint`` stores them and
``load_checkpoint`` rebuilds the narrow model from the zoo without pickling it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunelab.slim.layers import (
    Index,
    SlimBatchNorm,
    SlimLayer,
    SwitchableBatchNorm,
    restore_class,
)
from prunelab.slim.supernet import SPEC_ATTR, Width, _replace, set_width, spec_of
from prunelab.structured.graph import apply_plan


def export(net: nn.Module, width: Width) -> nn.Module:
    """A plain model equal to ``net`` at ``width`` (in eval mode), with the other channels gone.

    ``width`` is a fraction or per-layer ``{group root: channels}`` (from
    :func:`prunelab.slim.autoslim`). A US-Net should be calibrated at that width first
    (:func:`prunelab.slim.calibrate_bn`); otherwise its shared training statistics are used.
    """
    spec = spec_of(net)
    masks = spec.masks(width)
    plain = copy.deepcopy(net)
    set_width(plain, width)
    for name, module in list(plain.named_modules()):
        if isinstance(module, SwitchableBatchNorm):
            index = spec.outs[name].active(masks) if name in spec.outs else None
            _replace(plain, name, _plain_norm(module.bns[module.slim_choice], module, index))
        elif isinstance(module, SlimBatchNorm):
            stats = module.slim_calibrated.get(module.slim_key)
            index = module.slim_out
            restore_class(module)
            if stats is not None:
                _scatter(module.running_mean, index, stats[0])
                _scatter(module.running_var, index, stats[1])
        elif isinstance(module, SlimLayer):
            restore_class(module)
    delattr(plain, SPEC_ATTR)
    plan = {g.root: (~mask).nonzero().flatten().tolist()
            for g, mask in zip(spec.groups, masks, strict=True) if not bool(mask.all())}
    apply_plan(plain, plan, torch.zeros(1, *spec.input_shape,
                                        device=next(plain.parameters()).device))
    return plain


def _plain_norm(private: nn.Module, switch: SwitchableBatchNorm, index: Index) -> nn.Module:
    """A full-size BatchNorm whose active channels hold a private BatchNorm's values."""
    full = switch.slim_base(switch.num_features, private.eps, private.momentum, private.affine,
                            private.track_running_stats)
    full.to(next(iter(private.state_dict().values())).device)
    with torch.no_grad():
        for name, tensor in private.state_dict().items():
            target = full.state_dict()[name]
            if name == "num_batches_tracked":
                target.copy_(tensor)
            else:
                _scatter(target, index, tensor)
    full.train(private.training)
    return full


def _scatter(target: torch.Tensor | None, index: Index, values: torch.Tensor) -> None:
    """Write ``values`` into the channels ``index`` of ``target`` (all when None)."""
    if target is None:
        return
    with torch.no_grad():
        if index is None:
            target.copy_(values)
        elif isinstance(index, slice):
            target[: index.stop].copy_(values)
        else:
            target[index.to(target.device)] = values

