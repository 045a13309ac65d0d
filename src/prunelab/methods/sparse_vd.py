"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017).

Every weight gets a Gaussian posterior N(θ, σ²) written with the *additive* noise
reparameterisation (σ² is its own parameter, so large dropout rates α = σ²/θ² do not blow up
the gradient's variance), and the layer's output is sampled with the *local reparameterisation
trick*: a Linear/Conv output is Gaussian with mean ``f(x; θ)`` and variance ``f(x²; σ²)``, so one
noise draw per output unit replaces one per weight. The KL divergence to the log-uniform prior
uses the paper's approximation

    −KL ≈ k1·σ(k2 + k3·log α) − ½·log(1 + 1/α) − k1,  k1 = 0.63576, k2 = 1.87320, k3 = 1.48695,

and the loss is the mean cross-entropy plus KL/N (the ELBO divided by the N training examples).
Weights with log α > 3 are pruned: at test time the layer uses θ with those weights zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.methods.base import NonNegative, register_method
from prunelab.methods.learned import (
    LAYER_TYPES,
    GateCallback,
    LearnedMaskMethod,
    LearnedWeight,
    check_positive,
    dataset_size,
)
from prunelab.sparsity import PrunableWeight, prunable_weights
from prunelab.sparsity.masks import get_mask, layer_type_name
from prunelab.training import Callback, TrainState

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_LIMIT = 8.0  # log α is clipped to ±8, as in the authors' code, for a stable KL


def neg_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """The paper's approximation of −KL(q(w | θ, α) ‖ log-uniform prior), per weight."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


class VariationalWeight(LearnedWeight):
    """``θ`` in training (the forward hook adds the output noise), ``θ·[log α ≤ threshold]``
    in eval. Holds ``log σ²``, one per weight, regularised by the KL only (no weight decay)."""

    no_weight_decay = True

    def __init__(self, shape: torch.Size, threshold: float, init_log_sigma2: float):
        super().__init__()
        self.threshold = threshold
        self.log_sigma2 = nn.Parameter(torch.full(shape, init_log_sigma2))
        self.handle = None

    def log_alpha(self, theta: torch.Tensor) -> torch.Tensor:
        return (self.log_sigma2 - torch.log(theta.pow(2) + 1e-8)).clamp(
            -LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.training:
            return theta
        return theta * (self.log_alpha(theta) <= self.threshold)

    def install(self, module: nn.Module, param: str) -> None:
        self.handle = module.register_forward_hook(self.add_noise)

    def uninstall(self, module: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()

    def add_noise(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Local reparameterisation: output + sqrt(f(x²; σ²))·ε, one ε per output unit."""
        if not self.training:
            return output
        variance = self.log_sigma2.exp()
        mask = get_mask(module)
        if mask is not None:
            variance = variance * mask
        x = args[0]
        if isinstance(module, nn.Linear):
            var = F.linear(x * x, variance)
        else:
            var = module._conv_forward(x * x, variance, None)
        return output + (var + 1e-8).sqrt() * torch.randn_like(output)


class SparseVDCallback(GateCallback):
    """Installs the variational posterior on every Linear/Conv weight and adds ``kl_weight · KL/N``
    (N: training examples per epoch) with a linear warm-up of ``kl_weight`` over
    ``warmup_epochs``; bakes ``θ`` and the log α ≤ threshold mask at the end."""

    def __init__(self, kl_weight: float = 1.0, threshold: float = 3.0,
                 init_log_sigma2: float = -10.0, warmup_epochs: float = 0.0):
        self.kl_weight = check_positive(kl_weight, "KL weight")
        self.warmup = check_positive(warmup_epochs, "warmup_epochs")
        self.threshold, self.init_log_sigma2 = threshold, init_log_sigma2

    def on_setup(self, model: nn.Module) -> None:
        check_supported(model)
        super().on_setup(model)

    def make_gate(self, weight: PrunableWeight) -> LearnedWeight:
        return VariationalWeight(weight.original.shape, self.threshold, self.init_log_sigma2)

    def penalty(self, state: TrainState) -> torch.Tensor:
        kl = []
        for module in state.model.modules():
            gate = _gate(module)
            if gate is not None:
                kl.append(-neg_kl(gate.log_alpha(module.parametrizations.weight.original)).sum())
        scale = self.kl_weight
        if self.warmup:
            scale *= min(1.0, state.step / (self.warmup * state.steps_per_epoch))
        return scale * torch.stack(kl).sum() / dataset_size(state)


def _gate(module: nn.Module) -> VariationalWeight | None:
    from prunelab.methods.learned import learned

    gate = learned(module)
    return gate if isinstance(gate, VariationalWeight) else None


def check_supported(model: nn.Module) -> None:
    """Refuse prunable layers the local reparameterisation is not written for, by name."""
    for weight in prunable_weights(model):
        if not isinstance(weight.module, LAYER_TYPES) or weight.param != "weight":
            kind = layer_type_name(weight.module)
            raise InvalidValueError(
                f"sparse variational dropout supports Linear and Conv1d/2d/3d weights only; "
                f"{weight.name!r} is a {kind} parameter ({weight.param}): use another method "
                "for such models")


def log_alphas(model: nn.Module) -> dict[str, torch.Tensor]:
    """log α of every weight under sparse VD, by layer name (while training is under way)."""
    return {name: g.log_alpha(m.parametrizations.weight.original).detach()
            for name, m in model.named_modules() if (g := _gate(m)) is not None}


@register_method("sparse-vd")
@dataclass
class SparseVariationalDropout(LearnedMaskMethod):
    """Sparse variational dropout (Molchanov et al. 2017): per-weight Gaussian dropout rates α
    learned by variational inference with a log-uniform prior (additive reparameterisation,
    local reparameterisation trick, the paper's KL approximation); weights with
    log α > ``threshold`` (3) are pruned when training ends, so the sparsity is learned, not set.

    The harness trains with ``training_callbacks`` (the paper: Adam, lr 1e-3, KL weight
    warmed up from 0); ``prune`` keeps that mask and only tops it up by magnitude if the target
    asks for more. Linear and convolution layers only (others are refused by name).
    """

    kl_weight: NonNegative = 1.0
    threshold: float = 3.0
    init_log_sigma2: float = -10.0
    warmup_epochs: NonNegative = 0.0

    def __post_init__(self) -> None:
        if not -LOG_ALPHA_LIMIT < self.threshold < LOG_ALPHA_LIMIT:
            raise InvalidValueError(
                f"sparse-vd threshold is a log α in ({-LOG_ALPHA_LIMIT:g}, {LOG_ALPHA_LIMIT:g}) "
                f"(log α is clipped there; the paper prunes above 3), got {self.threshold!r}")

    def training_callbacks(self) -> list[Callback]:
        return [SparseVDCallback(self.kl_weight, self.threshold, self.init_log_sigma2,
                                 self.warmup_epochs)]
