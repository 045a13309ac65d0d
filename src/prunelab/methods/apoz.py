"""APoZ: Average Percentage of Zeros (Hu et al. 2016)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.methods.base import Count, register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.scores import capture, channel_outputs, per_channel, per_channel_sum
from prunelab.utils import eval_mode, iter_batches


@register_method("apoz")
@dataclass
class APoZPruning(StructuredMethod):
    """APoZ (Hu et al. 2016): remove channels whose ReLU output is most often zero.

    The share of non-positive values of each channel after its BatchNorm (what a following ReLU
    turns into zeros) is measured over the calibration data; channels that are mostly zero carry
    little. Assumes a ReLU-family activation follows. Labels are not needed.
    """

    needs_data = True
    batches: Count | None = 8

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        watched = {m.name: m.module for g in groups for m in channel_outputs(g)}
        positive = {name: 0.0 for name in watched}
        counts = dict.fromkeys(watched, 0)

        def record(name: str, output: torch.Tensor) -> None:
            values = per_channel(output.detach())
            positive[name] = positive[name] + (values > 0).sum(1).float().cpu()
            counts[name] += values.shape[1]

        with eval_mode(model), torch.no_grad(), capture(watched, record):
            for x, _ in iter_batches(data, model, self.batches):
                model(x)
        # Share of positive values (1 − APoZ) per channel, averaged where several layers hold it.
        scores = []
        for group in groups:
            members = channel_outputs(group)
            share = per_channel_sum(group, members,
                                    lambda m: positive[m.name] / max(counts[m.name], 1))
            cover = per_channel_sum(group, members, lambda m: torch.ones(len(positive[m.name])))
            scores.append(share / cover.clamp_min(1))
        return scores
