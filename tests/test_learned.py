"""Learned sparsity: penalties' gradients against hand formulas, gates, sparse VD, merging."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError, PrunelabError
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
    with pytest.raises(InvalidValueError, match=f"option '{option}' must be float >= 0"):
        METHODS.get(name).create(**{option: -1.0})


# Learned thresholds (STR) and L0 gates


def test_str_forward_and_gradient_match_the_soft_threshold_formula() -> None:
    from prunelab.methods.str_threshold import SoftThreshold

    w = torch.tensor([0.5, -0.05, -0.3, 0.01], requires_grad=True)
    gate = SoftThreshold(s_init=-2.0)
    tau = torch.sigmoid(torch.tensor(-2.0))  # 0.119
    out = gate(w)
    assert torch.allclose(out, torch.tensor([0.5 - tau, 0.0, -(0.3 - tau), 0.0]))
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (out * upstream).sum().backward()
    active = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(w.grad, upstream * active)
    # d/ds: −sign(w)·σ'(s) over active weights.
    expected_s = -(torch.sign(w.detach()) * upstream * active).sum() * tau * (1 - tau)
    assert torch.allclose(gate.s.grad, expected_s)


def test_str_training_ends_with_ordinary_masks() -> None:
    model = mlp()
    method = METHODS.get("str").create(s_init=-1.5)  # threshold 0.18: some weights go at once
    train(model, batches(), TrainRecipe(epochs=1, batch_size=16, lr=0.01),
          callbacks=method.training_callbacks(), quiet=True)
    masks = [prunelab.sparsity.get_mask(m) for m in (model[0], model[2], model[4])]
    assert all(mask is not None for mask in masks)
    assert sum(int((mask == 0).sum()) for mask in masks) > 0
    assert all(not hasattr(m.parametrizations.weight[0], "s") for m in (model[0],))
    prunelab.prune(model, method, 0.9)
    assert prunelab.sparsity.mask_sparsity(model) == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize(("name", "param", "decays"), [
    ("l0", "log_alpha", False), ("sparse-vd", "log_sigma2", False), ("str", "s", True)])
def test_weight_decay_reaches_a_gate_only_where_the_method_uses_it(
        name: str, param: str, decays: bool) -> None:
    """L0's log α and sparse VD's log σ² have their penalty as prior (no weight decay in the
    papers); STR's threshold is made sparse *by* weight decay. One SGD step on a zero loss moves
    exactly the parameters that decay, by lr · weight_decay · value."""
    model = mlp()
    for callback in METHODS.get(name).create().training_callbacks():
        callback.on_setup(model)
    optimizer = TrainRecipe(lr=0.5, momentum=0.0, weight_decay=0.1).make_optimizer(model)
    gate = model[0].parametrizations.weight[0]
    before = getattr(gate, param).detach().clone()
    weight_before = model[0].parametrizations.weight.original.detach().clone()
    (0 * sum(p.sum() for p in model.parameters())).backward()
    optimizer.step()
    expected = before * (1 - 0.5 * 0.1) if decays else before
    torch.testing.assert_close(getattr(gate, param).detach(), expected)
    torch.testing.assert_close(model[0].parametrizations.weight.original.detach(),
                               weight_before * (1 - 0.5 * 0.1))  # the weights always decay


def test_l0_penalty_gradient_matches_the_expected_l0_formula() -> None:
    from prunelab.methods.l0_gates import GAMMA, ZETA, L0Callback

    model = mlp()
    callback = L0Callback(strength=2.0, temperature=0.5)
    callback.on_setup(model)
    s = state(model, batch_size=10, steps=3)  # N = 30
    callback.penalty(s).backward()
    for gate in callback.gates(model):
        p = torch.sigmoid(gate.log_alpha.detach() - 0.5 * torch.log(torch.tensor(-GAMMA / ZETA)))
        assert torch.allclose(gate.log_alpha.grad, 2.0 / 30 * p * (1 - p))


def test_hard_concrete_gates_in_eval_are_deterministic_with_exact_zeros() -> None:
    from prunelab.methods.l0_gates import HardConcreteGate

    gate = HardConcreteGate((6,), temperature=2 / 3, init_keep=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, -2.5, -1.0, 0.0, 2.0, 5.0]))
    gate.eval()
    first, second = gate.gate(), gate.gate()
    assert torch.equal(first, second)
    assert first[0] == 0 and first[1] == 0 and first[-1] == 1  # exact 0 and 1 reached
    expected = (torch.sigmoid(gate.log_alpha.detach()) * 1.2 - 0.1).clamp(0, 1)
    assert torch.equal(first, expected)
    gate.train()
    assert not torch.equal(gate.gate(), gate.gate())  # sampled in training


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_l0_training_bakes_test_time_gates_into_masks(granularity: str) -> None:
    model = mlp()
    method = METHODS.get("l0").create(strength=1.0, granularity=granularity)
    callbacks = method.training_callbacks()
    for c in callbacks:
        c.on_setup(model)
    with torch.no_grad():  # close some gates for sure
        model[0].parametrizations.weight[0].log_alpha[:2] = -10.0
    for c in callbacks:
        c.on_train_end(state(model))
    mask = prunelab.sparsity.get_mask(model[0])
    if granularity == "weight":
        assert mask is not None and not mask[:2].any()
        assert model[0].weight[:2].abs().sum() == 0
    else:  # a Linear layer's neuron gates are its input units: whole columns go
        assert mask is not None and not mask[:, :2].any() and mask[:, 2:].all()
        assert model[0].weight[:, :2].abs().sum() == 0


def test_l0_neuron_gates_count_the_weights_they_switch_off() -> None:
    """Louizos et al.'s group form: E[L0] = Σ_g |g|·P(z_g ≠ 0); a Linear layer's gates sit on
    its inputs (so the classifier's outputs are never gated), a convolution's on its filters."""
    from prunelab.methods.l0_gates import GAMMA, ZETA, L0Callback

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
                          nn.ReLU(), nn.Linear(5, 3))
    callback = L0Callback(strength=2.0, granularity="neuron", temperature=0.5)
    callback.on_setup(model)
    gates = callback.gates(model)
    assert [tuple(g.log_alpha.shape) for g in gates] == [(4,), (16,), (5,)]
    assert [g.group_size for g in gates] == [3 * 3 * 3, 5, 3]  # weights per filter / column
    with torch.no_grad():
        for g in gates:
            g.log_alpha.normal_()
    callback.penalty(state(model, batch_size=10, steps=3)).backward()  # N = 30
    for g in gates:
        p = torch.sigmoid(g.log_alpha.detach() - 0.5 * torch.log(torch.tensor(-GAMMA / ZETA)))
        assert torch.allclose(g.log_alpha.grad, 2.0 / 30 * g.group_size * p * (1 - p))
    with torch.no_grad():  # closing a filter's gate zeroes that filter's output channel
        gates[0].log_alpha[1] = -10.0
        gates[2].log_alpha[3] = -10.0
        gates[0].eval(), gates[2].eval()
        assert model[0].weight[1].abs().sum() == 0 and model[0].weight[0].abs().sum() > 0
        assert model[4].weight[:, 3].abs().sum() == 0 and model[4].weight[:, 2].abs().sum() > 0


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_temperature_must_be_positive(value: float) -> None:
    with pytest.raises(InvalidValueError, match="option 'temperature' must be float > 0"):
        METHODS.get("l0").create(temperature=value)


# Sparse variational dropout


def test_sparse_vd_uses_the_papers_constants_and_fits_the_true_kl() -> None:
    """The approximation differs from the exact −KL (up to its additive constant, which makes
    −KL → 0 as α → ∞: (Euler γ + log 2)/2) by under 0.01 for log α in [−4, 6]."""
    import math

    from prunelab.methods import sparse_vd

    assert (sparse_vd.K1, sparse_vd.K2, sparse_vd.K3) == (0.63576, 1.87320, 1.48695)
    t = torch.linspace(-12, 12, 2_000_001, dtype=torch.float64)
    density = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    limit = (0.5772156649 + math.log(2)) / 2
    for log_alpha in (-4.0, -2.0, 0.0, 1.0, 3.0, 6.0):
        # exact −KL up to a constant: ½ log α − E log|ε|, ε ~ N(1, α)
        e_log = (torch.log((1 + math.exp(log_alpha / 2) * t).abs()) * density).sum() * (t[1] - t[0])
        exact = 0.5 * log_alpha - float(e_log) - limit
        approx = float(sparse_vd.neg_kl(torch.tensor(log_alpha)))
        assert abs(approx - exact) < 0.01, log_alpha


def vd_model() -> tuple[nn.Sequential, object]:
    from prunelab.methods.sparse_vd import SparseVDCallback

    model = mlp()
    callback = SparseVDCallback(kl_weight=1.5, init_log_sigma2=-4.0)
    callback.on_setup(model)
    return model, callback


def test_sparse_vd_kl_gradient_matches_the_hand_formula() -> None:
    from prunelab.methods.sparse_vd import K1, K2, K3

    model, callback = vd_model()
    callback.penalty(state(model, batch_size=10, steps=2)).backward()  # N = 20
    for layer in (model[0], model[2], model[4]):
        gate = layer.parametrizations.weight[0]
        theta = layer.parametrizations.weight.original.detach()
        la = (gate.log_sigma2.detach() - torch.log(theta**2 + 1e-8))
        assert la.abs().max() < 8  # not clipped here
        z = torch.sigmoid(K2 + K3 * la)
        d_neg_kl = K1 * K3 * z * (1 - z) + 0.5 * torch.sigmoid(-la)
        assert torch.allclose(gate.log_sigma2.grad, -1.5 / 20 * d_neg_kl, rtol=1e-4, atol=1e-9)


def test_local_reparameterisation_has_the_analytic_mean_and_variance() -> None:
    model, _ = vd_model()
    layer = model[0]
    x = torch.randn(3, 4)
    theta = layer.parametrizations.weight.original.detach()
    sigma2 = layer.parametrizations.weight[0].log_sigma2.detach().exp()
    torch.manual_seed(0)
    samples = torch.stack([layer(x.expand(1, 3, 4)[0]).detach() for _ in range(20000)])
    assert torch.allclose(samples.mean(0), x @ theta.T + layer.bias.detach(), atol=0.01)
    assert torch.allclose(samples.var(0), (x * x) @ sigma2.T, rtol=0.05)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no noise at test time


def test_sparse_vd_prunes_weights_with_log_alpha_above_3() -> None:
    model, callback = vd_model()
    layer = model[0]
    theta = layer.parametrizations.weight.original.detach()
    with torch.no_grad():  # log α = 2.9 for row 0, 3.1 for row 1, low elsewhere
        log_sigma2 = layer.parametrizations.weight[0].log_sigma2
        log_sigma2.copy_(torch.log(theta**2 + 1e-8) - 5)
        log_sigma2[0] = torch.log(theta[0] ** 2 + 1e-8) + 2.9
        log_sigma2[1] = torch.log(theta[1] ** 2 + 1e-8) + 3.1
    callback.on_train_end(state(model))
    mask = prunelab.sparsity.get_mask(layer)
    assert mask[0].all() and not mask[1].any() and mask[2:].all()
    assert torch.equal(layer.parametrizations.weight.original, theta)
    assert not layer._forward_hooks  # the noise hook is gone


def test_sparse_vd_on_an_unsupported_layer_names_it() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    callback = METHODS.get("sparse-vd").create().training_callbacks()[0]
    with pytest.raises(InvalidValueError, match="'0' is a Embedding parameter"):
        callback.on_setup(model)


def test_sparse_vd_trains_with_the_harness_and_leaves_masks() -> None:
    model = mlp()
    method = METHODS.get("sparse-vd").create(kl_weight=1.0, warmup_epochs=0.5)
    train(model, batches(), TrainRecipe(epochs=2, batch_size=16, optimizer="adam", lr=1e-2,
                                        weight_decay=0), callbacks=method.training_callbacks(),
          quiet=True)
    assert prunelab.sparsity.get_mask(model[0]) is not None
    assert all(not hasattr(m, "parametrizations") or len(m.parametrizations.weight) == 1
               for m in model)
    before = prunelab.sparsity.mask_sparsity(model)
    prunelab.prune(model, method, 0.0)  # the learned mask stays
    assert prunelab.sparsity.mask_sparsity(model) == before


# Variance pruning and neuron merging


def merge_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 4, generator=g) for _ in range(4)]


def test_merging_a_duplicated_neuron_leaves_the_output_unchanged() -> None:
    model = merge_model()
    with torch.no_grad():  # neuron 3 duplicates neuron 1, scaled by 2 (so β = 2)
        model[0].weight[3] = 2 * model[0].weight[1]
        model[0].bias[3] = 2 * model[0].bias[1]
    x = torch.randn(10, 4)
    before = model(x)
    prunelab.prune(model, "merge", 1 / 6, data=calibration(), include=["0"])
    assert model[0].out_features == 5 and model[2].in_features == 5
    assert torch.allclose(model(x), before, atol=1e-5)


def constant_neuron_model() -> nn.Module:
    """:func:`merge_model` whose neuron 2 always outputs relu(0.7) = 0.7."""
    model = merge_model()
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0.7
    return model


def test_variance_pruning_of_a_constant_neuron_leaves_the_output_unchanged() -> None:
    model = constant_neuron_model()
    x = torch.randn(10, 4)
    before = model(x)
    prunelab.prune(model, "merge", 1 / 6, data=calibration(), include=["0"])
    assert model[0].out_features == 5
    assert torch.allclose(model(x), before, atol=1e-5)


def test_plain_removal_of_the_same_neuron_changes_the_output() -> None:
    model = constant_neuron_model()
    x = torch.randn(10, 4)
    before = model(x)
    prunelab.prune(model, "merge", 1 / 6, data=calibration(), include=["0"], compensate=False)
    assert model[0].out_features == 5
    assert not torch.allclose(model(x), before, atol=1e-3)


def test_of_two_duplicates_only_one_goes_and_chains_stay_exact() -> None:
    model = merge_model()
    with torch.no_grad():  # neurons 1, 3, 4 are copies: two can go at no cost
        for j in (3, 4):
            model[0].weight[j] = model[0].weight[1]
            model[0].bias[j] = model[0].bias[1]
    x = torch.randn(10, 4)
    before = model(x)
    prunelab.prune(model, "merge", 2 / 6, data=calibration(), include=["0"])
    assert model[0].out_features == 4
    assert torch.allclose(model(x), before, atol=1e-5)


def test_merging_without_calibration_data_is_refused() -> None:
    with pytest.raises(PrunelabError, match="needs calibration data"):
        prunelab.prune(merge_model(), "merge", 0.3, example_input=torch.zeros(1, 4))


def test_regularizer_runs_a_method_from_a_plain_pytorch_loop() -> None:
    import torch.nn.functional as F

    from prunelab.training import Regularizer

    model = mlp()
    data = batches()
    method = METHODS.get("sparse-vd").create()
    reg = Regularizer(model, method.training_callbacks(), steps_per_epoch=len(data),
                      batch_size=16, epochs=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert any(p is model[0].parametrizations.weight[0].log_sigma2
               for p in optimizer.param_groups[0]["params"])
    reg.begin(optimizer)
    for _ in range(2):
        for x, y in data:
            loss = F.cross_entropy(model(x), y) + reg.penalty()
            optimizer.zero_grad()
            loss.backward()
            reg.after_backward()
            optimizer.step()
            reg.step_end()
    assert reg.state.epoch == 2
    reg.end()
    assert prunelab.sparsity.get_mask(model[0]) is not None


@pytest.mark.parametrize(("method", "options", "message"), [
    ("sparse-vd", "{kl_weight: -1}", "option 'kl_weight' must be float >= 0"),
    ("l0", "{temperature: 0}", "option 'temperature' must be float > 0"),
    ("group-lasso", "{strength: -0.1}", "option 'strength' must be float >= 0"),
    ("l1-penalty", "{strength: -0.1}", "option 'strength' must be float >= 0"),
])
def test_cli_bad_learned_options_exit_2(tmp_path, capsys, method, options, message) -> None:
    from prunelab.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"method: {method}\nmethod_options: {options}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(config), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.integers(3, 8), st.floats(-3, 3).filter(lambda b: abs(b) > 0.1))
def test_merging_any_scaled_copy_is_exact(seed: int, hidden: int, scale: float) -> None:
    """A hidden neuron that is a positive or negative multiple of another (through ReLU, a
    negative copy is not affine in the original, so the copy is built after the activation)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    with torch.no_grad():  # relu(c·z) = c·relu(z) for c > 0: neuron 0 = |scale| × neuron 1
        model[0].weight[0] = abs(scale) * model[0].weight[1]
        model[0].bias[0] = abs(scale) * model[0].bias[1]
    data = [torch.randn(64, 3, generator=torch.Generator().manual_seed(seed))]
    x = torch.randn(7, 3)
    before = model(x)
    prunelab.prune(model, "merge", 1 / hidden, data=data)
    assert model[0].out_features == hidden - 1
    assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)
