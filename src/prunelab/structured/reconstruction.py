"""Sampled contributions of input channels to the next layer's output (ThiNet, He et al.).

For a channel group read by exactly one plain layer (a Conv2d with groups=1 or a Linear), the
reader's output at a sampled position is a sum over input channels c of
``Z[m, o, c] = Σ_k patch[m, c, k] · W[o, c, k]``. Removing channels removes columns of Z;
reconstruction methods choose which columns to drop and refit the reader's weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.methods.base import Count
from prunelab.structured.graph import ChannelGroup
from prunelab.structured.method import StructuredMethod
from prunelab.structured.scores import capture
from prunelab.utils import eval_mode, iter_batches

IMAGES_PER_BATCH = 8  # patches come from a few images per batch, to bound memory


def single_reader(group: ChannelGroup) -> nn.Module | None:
    """The one plain layer that reads the group's channels one-to-one, or None."""
    readers = group.readers
    if group.coupled or len(readers) != 1 or not readers[0].aligned:
        return None
    reader = readers[0].module
    if isinstance(reader, nn.Linear) and reader.in_features == group.size:
        return reader
    if isinstance(reader, nn.Conv2d) and reader.groups == 1 and reader.in_channels == group.size:
        return reader
    return None


@dataclass
class Samples:
    """Sampled input patches of a reader: ``patches`` (M, C, K) and its weight (O, C, K)."""

    patches: torch.Tensor
    weight: torch.Tensor

    def contributions(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """Z at up to ``rows`` random (sample, output channel) pairs: (rows, C).

        Every pair of a wide layer would be M·O·C numbers (gigabytes for 512 channels), so
        pairs are drawn at random, as the papers sample outputs.
        """
        pairs = torch.randperm(len(self.patches) * len(self.weight), generator=generator)[:rows]
        m, o = pairs // len(self.weight), pairs % len(self.weight)
        return torch.einsum("rck,rck->rc", self.patches[m], self.weight[o])

    def output(self) -> torch.Tensor:
        """The reader's output at the samples, without bias: (M, O)."""
        return torch.einsum("mck,ock->mo", self.patches, self.weight)


def _patches(reader: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All input patches of a batch: (positions, C, K)."""
    x = x.detach().float()
    if isinstance(reader, nn.Linear):
        return x.reshape(-1, x.shape[-1], 1)
    cols = F.unfold(x, reader.kernel_size, dilation=reader.dilation, padding=reader.padding,
                    stride=reader.stride)  # (N, C*K, L)
    n, ck, positions = cols.shape
    channels = reader.in_channels
    return cols.transpose(1, 2).reshape(n * positions, channels, ck // channels)


def sample_readers(model: nn.Module, readers: dict[str, nn.Module], data: Iterable,
                   batches: int | None, samples: int, seed: int = 0) -> dict[str, Samples]:
    """Up to ``samples`` random input patches of each reader over the calibration data."""
    generator = torch.Generator().manual_seed(seed)
    found: dict[str, list[torch.Tensor]] = {name: [] for name in readers}

    def record(name: str, x: torch.Tensor) -> None:
        images = torch.randperm(len(x), generator=generator)[:IMAGES_PER_BATCH]
        patches = _patches(readers[name], x[images.to(x.device)])
        take = torch.randperm(len(patches), generator=generator)[:samples]
        found[name].append(patches[take].cpu())

    with eval_mode(model), torch.no_grad(), capture(readers, record, inputs=True):
        for x, _ in iter_batches(data, model, batches):
            model(x)
    result = {}
    for name, reader in readers.items():
        patches = torch.cat(found[name])
        patches = patches[torch.randperm(len(patches), generator=generator)[:samples]]
        weight = reader.weight.detach().float().cpu()
        result[name] = Samples(patches, weight.reshape(weight.shape[0], weight.shape[1], -1))
    return result


@dataclass
class ReconstructionMethod(StructuredMethod):
    """Base of methods that rank channels on sampled reader inputs and then refit the reader.

    Subclasses implement :meth:`rank` (scores from a group's samples) and :meth:`refit` (new
    reader weights for the kept channels, before the removed ones go).
    """

    needs_data = True
    batches: Count | None = 8
    samples: Count = 2000
    seed: int = 0
    _samples: dict[str, Samples] = field(default_factory=dict, init=False, repr=False)

    rejects = ("its reconstruction needs channels read by exactly one plain layer (a Conv2d "
               "with groups=1 or a Linear) and produced by one")

    def accepts(self, group: ChannelGroup) -> bool:
        return single_reader(group) is not None

    def rank(self, sample: Samples) -> torch.Tensor:
        """One score per input channel of the reader; higher means keep."""
        raise NotImplementedError

    def refit(self, reader: nn.Module, sample: Samples, kept: list[int]) -> None:
        """Adjust ``reader``'s weights so the kept channels reproduce its sampled output."""
        raise NotImplementedError

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        readers = {g.root: single_reader(g) for g in groups}
        self._samples = sample_readers(model, readers, data, self.batches, self.samples,
                                       self.seed)
        return [self.rank(self._samples[g.root]) for g in groups]

    def reconstruct(self, model: nn.Module, groups: list[ChannelGroup],
                    plan: dict[str, list[int]], data: Iterable | None) -> None:
        for group in groups:
            removed = set(plan.get(group.root, []))
            if removed:
                kept = [c for c in range(group.size) if c not in removed]
                with torch.no_grad():
                    self.refit(single_reader(group), self._samples[group.root], kept)
        self._samples = {}
