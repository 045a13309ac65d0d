"""ThiNet (Luo et al. 2017): prune channels by how well the next layer's output survives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import Count, register_method
from prunelab.structured.reconstruction import ReconstructionMethod, Samples


def greedy_removal_order(z: torch.Tensor) -> list[int]:
    """ThiNet's greedy selection: repeatedly remove the channel whose contribution, added to
    those already removed, changes the sampled outputs least. ``z`` is (samples, channels)."""
    removed_sum = torch.zeros(z.shape[0], dtype=z.dtype)
    remaining = list(range(z.shape[1]))
    order = []
    column_norms = z.pow(2).sum(0)
    while remaining:
        candidates = torch.tensor(remaining)
        error = 2 * removed_sum @ z[:, candidates] + column_norms[candidates]
        pick = remaining[int(error.argmin())]
        order.append(pick)
        remaining.remove(pick)
        removed_sum += z[:, pick]
    return order


@register_method("thinet")
@dataclass
class ThiNet(ReconstructionMethod):
    """ThiNet (Luo et al. 2017): greedy channel selection by next-layer reconstruction.

    On sampled activations, the next layer's output at a random position and output channel is
    a sum of per-input-channel contributions; channels are removed greedily so that the removed
    contributions add up to as little as possible. After removal, the kept input channels of the
    next layer are rescaled by least squares to restore its output. Needs a channel group read
    by one plain layer, so channels tied across a residual addition are left alone (as the
    paper does for ResNets). Labels are not needed.
    """

    samples: Count = 4000

    def _contributions(self, sample: Samples) -> torch.Tensor:
        """(samples, channels) at random (sample, output channel) pairs, as in the paper."""
        generator = torch.Generator().manual_seed(self.seed)
        return sample.contributions(len(sample.patches), generator).double()

    def rank(self, sample: Samples) -> torch.Tensor:
        order = greedy_removal_order(self._contributions(sample))
        score = torch.empty(len(order))
        score[torch.tensor(order)] = torch.arange(len(order), dtype=torch.float32)
        return score  # removed first = least important

    def refit(self, reader: nn.Module, sample: Samples, kept: list[int]) -> None:
        """Least-squares scales for the kept input channels of the reader."""
        z = self._contributions(sample)
        scales = torch.linalg.lstsq(z[:, kept], z.sum(1, keepdim=True)).solution[:, 0]
        shape = (1, -1, *[1] * (reader.weight.dim() - 2))
        reader.weight[:, kept] *= scales.to(reader.weight.dtype).view(shape)
