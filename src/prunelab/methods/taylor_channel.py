"""First-order Taylor channel importance (Molchanov et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import Count, register_method
from prunelab.metrics.accuracy import task_loss
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.graph import Member
from prunelab.utils import eval_mode, iter_batches


def _channel_params(group: ChannelGroup) -> list[tuple[torch.Tensor, Member]]:
    """Parameters whose first dimension runs over the group's channels, with their layer."""
    found = []
    for member in group.producers + [n for n in group.norms if n.side == "out"]:
        for name in ("weight", "bias"):
            tensor = getattr(member.module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                found.append((tensor, member))
    return found


@register_method("taylor-channel")
@dataclass
class TaylorChannelPruning(StructuredMethod):
    """Taylor channel importance: (Σ w·∂L/∂w over a channel's parameters)², summed over batches.

    The first-order estimate of the loss change when the channel is removed (Molchanov et al.
    2019), over the producing filters and the BatchNorm scale and shift of each channel,
    squared per batch and accumulated. Needs labelled batches.
    """

    needs_data = True
    batches: Count | None = 8
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        loss_fn = self.loss or task_loss
        params = [_channel_params(g) for g in groups]
        scores = [torch.zeros(g.size) for g in groups]
        with eval_mode(model), torch.enable_grad():
            for x, y in iter_batches(data, model, self.batches):
                if y is None:
                    raise InvalidValueError("taylor-channel needs labelled batches (x, y)")
                tensors = [t for group in params for t, _ in group]
                grads = iter(torch.autograd.grad(loss_fn(model(x), y), tensors,
                                                 allow_unused=True))
                for score, group in zip(scores, params, strict=True):
                    total = torch.zeros_like(score)
                    for tensor, member in group:
                        grad = next(grads)
                        if grad is not None:
                            product = (tensor.detach() * grad).float().cpu()
                            per_channel = product.reshape(product.shape[0], -1).sum(1)
                            total[member.positions] += per_channel[member.idxs]
                    score += total.pow(2)
        return scores
