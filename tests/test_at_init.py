"""Pruning at initialisation (SNIP, GraSP, SynFlow) and per-layer density distributions,
against hand computations and independent autograd references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunelab
from prunelab import models
from prunelab.errors import NothingToPruneError, PrunelabError
from prunelab.methods import METHODS
from prunelab.sparsity import get_mask, mask_sparsity, prunable_weights
from prunelab.sparsity.distributions import layer_densities, layer_keep_counts

shapes = st.lists(
    st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)),
              st.tuples(st.integers(1, 16), st.integers(1, 16), st.sampled_from([1, 3]),
                        st.sampled_from([1, 3]))),
    min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes, density=st.floats(0.001, 1.0), kind=st.sampled_from(["uniform", "er",
                                                                              "erk"]))
def test_distribution_keeps_exactly_the_target_count(shapes, density, kind) -> None:
    sizes = [math.prod(s) for s in shapes]
    densities = layer_densities(shapes, density, kind)
    assert all(0.0 <= d <= 1.0 + 1e-12 for d in densities)
    assert sum(d * n for d, n in zip(densities, sizes, strict=True)) == pytest.approx(
        density * sum(sizes), rel=1e-9)
    counts = layer_keep_counts(shapes, density, kind)
    assert sum(counts) == round(density * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))


def test_erk_follows_sum_over_product_and_redistributes() -> None:
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    raw = [sum(s) / math.prod(s) for s in shapes]
    densities = layer_densities(shapes, 0.05, "erk")
    assert max(densities) < 1
    assert [d / densities[0] for d in densities] == pytest.approx([r / raw[0] for r in raw])
    # At 20% the classifier (highest sum/prod), then the first conv, would be over 1: they
    # are made dense and the rest share the remainder in proportion to sum(shape)/prod(shape).
    densities = layer_densities(shapes, 0.2, "erk")
    assert densities[3] == densities[0] == 1.0
    assert densities[2] / densities[1] == pytest.approx(raw[2] / raw[1])
    er = layer_densities(shapes, 0.3, "er")
    assert er[2] / er[1] == pytest.approx((64 + 32) / (64 * 32) / ((32 + 16) / (32 * 16)))


def test_dense_layers_count_toward_the_budget() -> None:
    shapes = [(20, 10), (30, 20), (10, 30)]
    densities = layer_densities(shapes, 0.5, "erk", dense={0})
    assert densities[0] == 1.0
    total = sum(d * math.prod(s) for d, s in zip(densities, shapes, strict=True))
    assert total == pytest.approx(0.5 * 1100)
    with pytest.raises(PrunelabError, match="kept dense"):
        layer_densities(shapes, 0.1, "erk", dense={1})


@pytest.mark.parametrize("scope", ["er", "erk"])
def test_distribution_scopes_prune_each_layer_to_its_share(scope: str) -> None:
    torch.manual_seed(0)
    model = models.create("resnet20")
    prunelab.prune(model, "magnitude", 0.9, scope=scope)
    weights = prunable_weights(model)
    counts = layer_keep_counts([tuple(w.original.shape) for w in weights], 0.1, scope)
    assert [int(w.mask.sum()) for w in weights] == counts
    # Within a layer the largest magnitudes are kept.
    first = weights[1]
    kept = first.original[first.mask.bool()].abs().min()
    dropped = first.original[~first.mask.bool()].abs().max()
    assert kept >= dropped


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])


def test_snip_scores_equal_the_hand_computed_connection_sensitivity() -> None:
    model, (x, y) = mlp(), batch()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    # Backpropagation by hand: logits = W2 relu(W1 x), loss = sum of cross-entropies.
    pre = x @ w1.T
    hidden = pre.clamp(min=0)
    delta = torch.softmax(hidden @ w2.T, dim=1) - F.one_hot(y, 2).float()
    grad2 = delta.T @ hidden
    grad1 = ((delta @ w2) * (pre > 0)).T @ x
    sensitivity = [(w1 * grad1).abs(), (w2 * grad2).abs()]
    total = sum(s.sum() for s in sensitivity)
    method = METHODS.get("snip").create()
    scores = method.scores(model, prunable_weights(model), [(x, y)])
    for got, expected in zip(scores, sensitivity, strict=True):
        torch.testing.assert_close(got, expected / total)
    assert float(sum(s.sum() for s in scores)) == pytest.approx(1.0)


def test_snip_prunes_the_lowest_sensitivities_globally() -> None:
    model, data = mlp(), [batch()]
    scores = METHODS.get("snip").create().scores(model, prunable_weights(model), data)
    flat = torch.cat([s.reshape(-1) for s in scores])
    prunelab.prune(model, "snip", 0.5, data=data)
    masks = torch.cat([get_mask(model[0]).reshape(-1), get_mask(model[2]).reshape(-1)])
    assert int((masks == 0).sum()) == 10
    assert flat[masks == 1].min() >= flat[masks == 0].max()


def test_grasp_scores_match_an_explicit_hessian() -> None:
    model, (x, y) = mlp(), batch()
    temperature = 3.0
    params = [model[0].weight, model[2].weight]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        a, b = theta[:12].view(shapes[0]), theta[12:].view(shapes[1])
        logits = (x @ a.T).clamp(min=0) @ b.T
        return F.cross_entropy(logits / temperature, y)  # the mean: H and g of the data

    g = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    removal = -flat * (hessian @ g)  # GraSP's score: the highest are removed
    method = METHODS.get("grasp").create(temperature=temperature)
    scores = method.scores(model, prunable_weights(model), [(x[:2], y[:2]), (x[2:], y[2:])])
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in scores]), -removal)
    prunelab.prune(model, "grasp", 0.25, data=[(x, y)], temperature=temperature)
    masks = torch.cat([get_mask(model[0]).reshape(-1), get_mask(model[2]).reshape(-1)])
    assert set(removal.topk(5).indices.tolist()) == set((masks == 0).nonzero()[:, 0].tolist())


def test_grasp_normalises_with_batch_statistics_as_the_papers_code() -> None:
    """GraSP's code scores the network in training mode: BatchNorm uses each batch's statistics.
    The same scores come from BatchNorms that have no running statistics at all, in eval mode;
    the running statistics are left as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(8, 3, 6, 6) * 3 + 1, torch.randint(0, 3, (8,))
    stateless = type(model)(*(nn.BatchNorm2d(4, track_running_stats=False)
                              if isinstance(m, nn.BatchNorm2d) else m for m in model))
    grasp = METHODS.get("grasp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = grasp.create(temperature=2.0).scores(model, prunable_weights(model), [(x, y)])
    expected = grasp.create(temperature=2.0, batchnorm="running").scores(
        stateless, prunable_weights(stateless), [(x, y)])
    for got, want in zip(batch, expected, strict=True):
        torch.testing.assert_close(got, want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    running = grasp.create(temperature=2.0, batchnorm="running").scores(
        model, prunable_weights(model), [(x, y)])
    assert not torch.allclose(running[0], batch[0])  # untrained stats (0, 1) normalise nothing
    with pytest.raises(PrunelabError, match="one of 'batch', 'running'"):
        grasp.create(batchnorm="eval")


def test_grasp_needs_labelled_data() -> None:
    with pytest.raises(PrunelabError, match="needs calibration data"):
        prunelab.prune(mlp(), "grasp", 0.5)
    with pytest.raises(PrunelabError, match="labelled"):
        prunelab.prune(mlp(), "grasp", 0.5, data=[torch.randn(4, 3)])


def test_synflow_scores_equal_the_hand_computed_flow() -> None:
    model = mlp()
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    # With |W| and an all-ones input the ReLU passes everything: R = 1ᵀ|W2||W1|1.
    expected1 = w2.abs().sum(0).unsqueeze(1) * w1.abs()
    expected2 = (w1.abs().sum(1)).unsqueeze(0) * w2.abs()
    method = METHODS.get("synflow").create(input_shape=(3,))
    got = method.scores(model, prunable_weights(model), None)
    torch.testing.assert_close(got[0].abs(), expected1)
    torch.testing.assert_close(got[1].abs(), expected2)


def test_synflow_is_data_free_and_leaves_the_model_alone() -> None:
    model = models.create("resnet20")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = METHODS.get("synflow").create()
    weights = prunable_weights(model)
    without = method.scores(model, weights, None)
    noise = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    images = [(torch.rand(4, 3, 32, 32) * 9, torch.zeros(4, dtype=torch.long))]
    for data in (noise, images):
        for a, b in zip(without, method.scores(model, weights, data), strict=True):
            assert torch.equal(a, b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.training


@pytest.mark.parametrize("rounds", [1, 7])
def test_synflow_reaches_the_exact_target(rounds: int) -> None:
    model = models.create("resnet20")
    prunelab.prune(model, "synflow", 0.97, rounds=rounds)
    total = sum(w.numel() for w in prunable_weights(model))
    assert mask_sparsity(model) == round(0.97 * total) / total


def test_synflow_iterations_avoid_the_collapse_of_one_shot() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                          nn.Linear(200, 5))
    one_shot = prunelab.prune(__import__("copy").deepcopy(model), "synflow", 0.995, rounds=1,
                              input_shape=(20,))
    iterative = prunelab.prune(model, "synflow", 0.995, rounds=50, input_shape=(20,))

    def alive(net: nn.Module) -> list[int]:
        return [int(get_mask(net[i]).sum()) for i in (0, 2, 4)]

    assert min(alive(iterative)) > 0
    assert alive(one_shot) != alive(iterative)


def test_synflow_without_prunable_layer_or_shape_is_one_line() -> None:
    with pytest.raises(NothingToPruneError, match="no prunable layer"):
        prunelab.prune(nn.Sequential(nn.ReLU()), "synflow", 0.5, input_shape=(3,))
    with pytest.raises(PrunelabError, match="input_shape"):
        prunelab.prune(mlp(), "synflow", 0.5)


def test_channel_methods_refuse_distribution_scopes() -> None:
    with pytest.raises(PrunelabError, match="global or layer"):
        prunelab.prune(models.create("resnet20"), "l1-filter", 0.3, scope="erk")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--schedule", "at-init"], "recovery 'finetune' makes no sense"),
     (["--recovery", "sparse-train"], "set schedule to at-init"),
     (["--schedule", "at-init", "--recovery", "none", "--sparsity", "1"], "[0, 1)"),
     (["--schedule", "at-init", "--recovery", "sparse-train", "--method", "grasp",
       "--sparsity", "0.9999"], "prunes every weight of layer")],
)
def test_cli_refuses_bad_at_init_runs_in_one_line(tmp_path, capsys, args, message) -> None:
    from prunelab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-q", "--epochs", "1", "--out", str(tmp_path / "runs"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
