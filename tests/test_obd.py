"""OBD: ½·h_ii·w² with the empirical Fisher or Hutchinson's diagonal estimate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.methods.obd import OptimalBrainDamage


def softmax_regression(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=g))
    return layer, torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)


def test_fisher_scores_are_half_mean_squared_per_sample_gradient_times_w_squared() -> None:
    layer, x, y = softmax_regression()
    w = layer.weight.detach().clone()
    fisher = torch.zeros(3, 4)
    for xn, yn in zip(x, y, strict=True):  # by hand: dCE/dW = (softmax(W x) - onehot(y)) x^T
        p = torch.softmax(w @ xn, dim=0)
        p[yn] -= 1
        fisher += torch.outer(p, xn) ** 2
    expected = 0.5 * fisher / len(x) * w**2
    method = OptimalBrainDamage(chunk=3)
    weights = prunelab.sparsity.prunable_weights(layer)
    scores = method.scores(layer, weights, [(x[:6], y[:6]), (x[6:], y[6:])])
    torch.testing.assert_close(scores[0], expected, atol=1e-6, rtol=1e-5)


def test_hutchinson_estimates_the_exact_hessian_diagonal() -> None:
    layer, x, y = softmax_regression(1)
    w0 = layer.weight.detach().clone()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(x @ w.T, y)

    exact = torch.autograd.functional.hessian(loss, w0).reshape(12, 12).diagonal().view(3, 4)
    method = OptimalBrainDamage(hessian="hutchinson", probes=1500, seed=3)
    weights = prunelab.sparsity.prunable_weights(layer)
    scores = method.scores(layer, weights, [(x, y)])
    estimate = scores[0] / (0.5 * w0**2)
    torch.testing.assert_close(estimate, exact, atol=0.01, rtol=0.1)


def test_obd_prunes_where_curvature_times_weight_squared_is_small() -> None:
    # Same magnitudes, but input 0 is 10x larger: OBD keeps its weights, magnitude cannot tell.
    torch.manual_seed(0)
    x = torch.randn(64, 2) * torch.tensor([10.0, 1.0])
    y = torch.randint(0, 2, (64,))
    for hessian in ("fisher", "hutchinson"):
        layer = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[0.1, -0.1], [-0.1, 0.1]]))
        prunelab.prune(layer, "obd", 0.5, data=[(x, y)], hessian=hessian, probes=64)
        assert (layer.weight[:, 1] == 0).all() and (layer.weight[:, 0] != 0).all()


def test_obd_leaves_gradients_and_batchnorm_alone_and_needs_labels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    model.train()
    stats = model[1].running_mean.clone()
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))]
    for hessian in ("fisher", "hutchinson"):
        prunelab.prune(model, "obd", 0.5, data=data, hessian=hessian)
    assert model.training and torch.equal(model[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(InvalidValueError, match="labelled"):
        prunelab.prune(model, "obd", 0.6, data=[torch.randn(8, 3, 6, 6)])
    with pytest.raises(InvalidValueError, match="hessian"):
        prunelab.prune(model, "obd", 0.6, data=data, hessian="exact")


def test_obd_takes_nm() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]
    prunelab.prune(model, "obd", 0.5, data=data, nm="2:4")
    assert ((model[0].weight.reshape(-1, 4) != 0).sum(1) == 2).all()
