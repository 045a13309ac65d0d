"""Channel pruning by LASSO regression and least-squares reconstruction (He et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prunelab.methods.base import Count, register_method
from prunelab.structured.reconstruction import ReconstructionMethod, Samples


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
class ChannelRegression(ReconstructionMethod):
    """Channel pruning by LASSO regression (He et al. 2017), then least-squares reconstruction.

    On sampled activations, the next layer's output is a sum of per-input-channel contributions
    with one coefficient β per channel; a LASSO path (on ``rows`` random sample/output pairs)
    ranks channels by how strong a sparsity penalty they survive. After choosing the channels,
    the next layer's weights for the kept channels are refit by linear least squares to
    reproduce its original output. Needs a channel group read by one plain layer (channels tied
    across residual additions are left alone).
    """

    samples: Count = 1500
    rows: Count = 20000

    def rank(self, sample: Samples) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        z = sample.contributions(self.rows, generator).double()  # (rows, C)
        return lasso_ranking(z, z.sum(1))

    def refit(self, reader: nn.Module, sample: Samples, kept: list[int]) -> None:
        """Refit the reader's weights on the kept channels: min ‖Y − X_kept W‖² (lstsq)."""
        target = sample.output().double()  # (M, O)
        inputs = sample.patches[:, kept].reshape(len(target), -1).double()
        solution = torch.linalg.lstsq(inputs, target).solution  # (kept*K, O)
        shape = (reader.weight.shape[0], len(kept), *reader.weight.shape[2:])
        reader.weight[:, kept] = solution.t().reshape(shape).to(reader.weight.dtype)
