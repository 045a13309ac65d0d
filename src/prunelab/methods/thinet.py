"""ThiNet (Luo et al. 2017): prune channels by how well the next layer's output survives."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunelab.methods.base import register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.reconstruction import Samples, sample_readers, single_reader


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
class ThiNet(StructuredMethod):
    """ThiNet (Luo et al. 2017): greedy channel selection by next-layer reconstruction.

    On sampled activations, the next layer's output at a random position and output channel is
    a sum of per-input-channel contributions; channels are removed greedily so that the removed
    contributions add up to as little as possible. After removal, the kept input channels of the
    next layer are rescaled by least squares to restore its output. Needs a channel group read
    by one plain layer, so channels tied across a residual addition are left alone (as the
    paper does for ResNets). Labels are not needed.
    """

    needs_data = True
    batches: int | None = 8
    samples: int = 4000
    seed: int = 0
    _samples: dict[str, Samples] = field(default_factory=dict, init=False, repr=False)

    def accepts(self, group: ChannelGroup) -> bool:
        return single_reader(group) is not None

    def _contributions(self, root: str) -> torch.Tensor:
        """(samples, channels) at one random output channel per sample, as in the paper."""
        sample = self._samples[root]
        generator = torch.Generator().manual_seed(self.seed)
        outputs = torch.randint(0, sample.weight.shape[0], (len(sample.patches),),
                                generator=generator)
        return torch.einsum("mck,mck->mc", sample.patches, sample.weight[outputs])

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        readers = {g.root: single_reader(g) for g in groups}
        self._samples = sample_readers(model, readers, data, self.batches, self.samples,
                                       self.seed)
        scores = []
        for group in groups:
            order = greedy_removal_order(self._contributions(group.root).double())
            score = torch.empty(group.size)
            score[torch.tensor(order)] = torch.arange(group.size, dtype=torch.float32)
            scores.append(score)  # removed first = least important
        return scores

    def reconstruct(self, model: nn.Module, groups: list[ChannelGroup],
                    plan: dict[str, list[int]], data: Iterable | None) -> None:
        """Least-squares scales for the kept input channels of each pruned group's reader."""
        for group in groups:
            removed = set(plan.get(group.root, []))
            if not removed:
                continue
            z = self._contributions(group.root).double()
            kept = [c for c in range(group.size) if c not in removed]
            scales = torch.linalg.lstsq(z[:, kept], z.sum(1, keepdim=True)).solution[:, 0]
            reader = single_reader(group)
            with torch.no_grad():
                reader.weight[:, kept] *= scales.to(reader.weight.dtype).view(
                    1, -1, *[1] * (reader.weight.dim() - 2))
        self._samples = {}
