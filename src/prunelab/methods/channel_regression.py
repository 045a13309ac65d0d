"""Channel pruning by LASSO regression and least-squares reconstruction (He et al. 2017)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunelab.methods.base import register_method
from prunelab.structured import ChannelGroup, StructuredMethod
from prunelab.structured.reconstruction import Samples, sample_readers, single_reader


def lasso_ranking(z: torch.Tensor, y: torch.Tensor, alphas: int = 60) -> torch.Tensor:
    """Per channel, the largest LASSO penalty at which its coefficient is still non-zero.

    Solves ``min ||y − Σ_c β_c z_c||² + α‖β‖₁`` along a path of α (scikit-learn's coordinate
    descent); channels that survive stronger penalties matter more.
    """
    from sklearn.linear_model import lasso_path

    alpha_grid, coefs, _ = lasso_path(z.numpy(), y.numpy(), alphas=alphas, max_iter=3000)
    alive = np.abs(coefs) > 0  # (channels, alphas), alphas decreasing
    first_alive = np.where(alive.any(1), alive.argmax(1), len(alpha_grid))
    strength = np.append(alpha_grid, 0.0)[first_alive]
    # Break ties (channels entering at the same alpha) by the coefficient at the weakest penalty.
    return torch.from_numpy(strength + 1e-9 * np.abs(coefs[:, -1])).float()


@register_method("lasso-channel")
@dataclass
class ChannelRegression(StructuredMethod):
    """Channel pruning by LASSO regression (He et al. 2017), then least-squares reconstruction.

    On sampled activations, the next layer's output is a sum of per-input-channel contributions
    with one coefficient β per channel; a LASSO path ranks channels by how strong a sparsity
    penalty they survive. After choosing the channels, the next layer's weights for the kept
    channels are refit by linear least squares to reproduce its original output. Needs a channel
    group read by one plain layer (channels tied across residual additions are left alone).
    """

    needs_data = True
    batches: int | None = 8
    samples: int = 1500
    seed: int = 0
    _samples: dict[str, Samples] = field(default_factory=dict, init=False, repr=False)

    def accepts(self, group: ChannelGroup) -> bool:
        return single_reader(group) is not None

    def channel_scores(self, model: nn.Module, groups: list[ChannelGroup],
                       data: Iterable | None) -> list[torch.Tensor]:
        readers = {g.root: single_reader(g) for g in groups}
        self._samples = sample_readers(model, readers, data, self.batches, self.samples,
                                       self.seed)
        scores = []
        for group in groups:
            z = self._samples[group.root].contributions().double()  # (M, O, C)
            scores.append(lasso_ranking(z.reshape(-1, z.shape[2]), z.sum(2).reshape(-1)))
        return scores

    def reconstruct(self, model: nn.Module, groups: list[ChannelGroup],
                    plan: dict[str, list[int]], data: Iterable | None) -> None:
        """Refit the reader's weights on the kept channels: min ‖Y − X_kept W‖² (lstsq)."""
        for group in groups:
            removed = set(plan.get(group.root, []))
            if not removed:
                continue
            sample = self._samples[group.root]
            kept = [c for c in range(group.size) if c not in removed]
            target = sample.output().double()  # (M, O)
            inputs = sample.patches[:, kept].reshape(len(target), -1).double()
            solution = torch.linalg.lstsq(inputs, target).solution  # (kept*K, O)
            reader = single_reader(group)
            shape = (reader.weight.shape[0], len(kept), *reader.weight.shape[2:])
            with torch.no_grad():
                reader.weight[:, kept] = solution.t().reshape(shape).to(reader.weight.dtype)
        self._samples = {}
