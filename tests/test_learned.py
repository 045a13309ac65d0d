"""Learned sparsity: penalties' gradients against hand formulas, gates, sparse VD, merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.methods import METHODS
from prunelab.methods.group_lasso import GroupLasso, remove_below
from prunelab.methods.l1_penalty import WeightL1
from prunelab.training import TrainRecipe, TrainState, train


def state(model: nn.Module, batch_size: int = 10, steps: int = 3) -> TrainState:
    """A TrainState for calling callbacks by hand (no optimiser needed)."""
    return TrainState(model, None, TrainRecipe(batch_size=batch_size), steps, steps)  # type: ignore[arg-type]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))


def batches(n: int = 4, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 2, (size,), generator=g))
            for _ in range(n)]


def test_l1_gradient_is_strength_times_sign() -> None:
    model = mlp()
    WeightL1(0.3).penalty(state(model)).backward()
    for layer in (model[0], model[2], model[4]):
        assert torch.allclose(layer.weight.grad, 0.3 * layer.weight.sign())
        assert layer.bias.grad is None


def test_group_lasso_gradient_is_w_over_group_norm() -> None:
    model = mlp()
    callback = GroupLasso(0.5, example_input=torch.zeros(1, 4))
    callback.on_setup(model)
    callback.penalty(state(model)).backward()
    # Hand formula: neuron j of layer 0 owns row j of layer 0 and column j of layer 2.
    a, b, c = model[0].weight, model[2].weight, model[4].weight
    norm1 = (a.pow(2).sum(1) + b.pow(2).sum(0)).sqrt()  # 5 hidden neurons
    norm2 = (b.pow(2).sum(1) + c.pow(2).sum(0)).sqrt()  # 3 hidden neurons
    expected_b = 0.5 * (b / norm1[None, :] + b / norm2[:, None])
    assert torch.allclose(a.grad, 0.5 * a / norm1[:, None])
    assert torch.allclose(b.grad, expected_b)
    assert torch.allclose(c.grad, 0.5 * c / norm2[None, :])  # classifier outputs: no group


def test_group_lasso_couples_residual_branches() -> None:
    model = prunelab.models.create("resnet20", input_shape=(3, 32, 32))
    callback = GroupLasso(1.0)
    callback.on_setup(model)
    coupled = [g for g in callback.groups if g.coupled]
    assert coupled, "the residual stages' channels are coupled groups"
    assert torch.isfinite(callback.penalty(state(model)))


def test_group_lasso_removes_zeroed_channels_physically() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[2].weight[:, 1] = 0
    x = torch.randn(8, 4)
    before = model(x)
    plan = remove_below(model, 1e-6, example_input=torch.zeros(1, 4))
    assert plan == {"0": [1]}
    assert model[0].out_features == 4 and model[2].in_features == 4
    assert torch.allclose(model(x), before, atol=1e-6)


def test_group_lasso_method_trains_and_prunes_to_the_target() -> None:
    model = mlp()
    model.input_shape = (4,)  # what zoo models carry; the groups are traced with it
    method = METHODS.get("group-lasso").create(strength=1e-2)
    train(model, batches(), TrainRecipe(epochs=1, batch_size=16, lr=0.01),
          callbacks=method.training_callbacks(), quiet=True)
    prunelab.prune(model, method, 0.5)
    assert model[0].out_features + model[2].out_features == 4


@pytest.mark.parametrize(("name", "option"), [("l1-penalty", "strength"),
                                              ("group-lasso", "strength")])
def test_negative_strength_is_refused(name: str, option: str) -> None:
    with pytest.raises(InvalidValueError, match="strength must be a finite number >= 0"):
        METHODS.get(name).create(**{option: -1.0})
