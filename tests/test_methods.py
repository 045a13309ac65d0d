"""Criteria against small hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import PrunelabError
from prunelab.methods import METHODS
from prunelab.methods.calibration import per_weight_input_norm


def linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def pruned_positions(layer: nn.Module) -> set[tuple[int, ...]]:
    return {tuple(i) for i in (layer.weight == 0).nonzero().tolist()}


def test_registry_lists_the_foundation_methods() -> None:
    assert {"random", "magnitude", "taylor", "activation"} <= set(METHODS.names())
    for name, cls in METHODS.items():
        assert cls.name == name and cls.summary(), f"{name} needs a docstring summary"


def test_magnitude_prunes_smallest_absolute_values() -> None:
    layer = linear([[1.0, -5.0], [0.5, 3.0]])
    prunelab.prune(layer, "magnitude", 0.5)
    assert pruned_positions(layer) == {(0, 0), (1, 0)}


def test_global_scope_ranks_across_layers_and_layer_scope_does_not() -> None:
    def model():
        return nn.Sequential(linear([[0.1, 0.2], [0.3, 0.4]]), linear([[10.0, 20.0], [30.0, 40.0]]))

    global_model = prunelab.prune(model(), "magnitude", 0.5, scope="global")
    assert len(pruned_positions(global_model[0])) == 4 and not pruned_positions(global_model[1])
    layer_model = prunelab.prune(model(), "magnitude", 0.5, scope="layer")
    assert pruned_positions(layer_model[0]) == {(0, 0), (0, 1)}
    assert pruned_positions(layer_model[1]) == {(0, 0), (0, 1)}


def test_taylor_scores_weight_times_mean_gradient() -> None:
    weight = [[0.5, -1.0], [2.0, 0.25]]
    layer = linear(weight)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([0, 1])
    # By hand: dCE/dW = sum_n (softmax(W x_n) - onehot(y_n)) x_n^T, averaged over samples.
    w = torch.tensor(weight)
    grad = torch.zeros(2, 2)
    for xn, yn in zip(x, y, strict=True):
        p = torch.softmax(w @ xn, dim=0)
        p[yn] -= 1
        grad += torch.outer(p, xn)
    scores = (w * grad / 2).abs()
    expected = {tuple(divmod(int(i), 2)) for i in scores.flatten().argsort()[:2]}
    prunelab.prune(layer, "taylor", 0.5, data=[(x[:1], y[:1]), (x[1:], y[1:])])
    assert pruned_positions(layer) == expected


def test_activation_weights_magnitude_by_input_norm() -> None:
    layer = linear([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    prunelab.prune(layer, "activation", 1 / 3, data=[x])
    assert pruned_positions(layer) == {(0, 0), (1, 0)}  # column 0 has the smallest input norm


def test_activation_norms_follow_conv_groups() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    norms = per_weight_input_norm(conv, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert norms[:, :, 0, 0].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    transposed = nn.ConvTranspose2d(3, 2, 1, bias=False)
    norms = per_weight_input_norm(transposed, torch.tensor([1.0, 2.0, 3.0]))
    assert norms[:, :, 0, 0].tolist() == [[1, 1], [2, 2], [3, 3]]


def test_random_is_reproducible_per_seed() -> None:
    def mask(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        layer = nn.Linear(20, 20)
        prunelab.prune(layer, "random", 0.5, seed=seed)
        return layer.weight == 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


@pytest.mark.parametrize("method", ["taylor", "activation"])
def test_data_methods_need_data(method: str) -> None:
    with pytest.raises(PrunelabError, match="needs calibration data"):
        prunelab.prune(nn.Linear(3, 3), method, 0.5)


def test_taylor_needs_labels() -> None:
    with pytest.raises(PrunelabError, match="labelled"):
        prunelab.prune(nn.Linear(3, 3), "taylor", 0.5, data=[torch.randn(2, 3)])


def test_scoring_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    stats = model[1].running_mean.clone()
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    prunelab.prune(model, "taylor", 0.5, data=data)
    prunelab.prune(model, "activation", 0.6, data=data)
    assert model.training and torch.equal(model[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


def test_compression_target_accounts_for_layer_overrides() -> None:
    model = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(),
                          nn.Linear(30, 5))
    prunelab.prune(model, "magnitude", compression=2.0, layer_sparsity={"4": 0.2})
    total, nonzero = prunelab.metrics.count_parameters(model)
    assert total / nonzero == pytest.approx(2.0, rel=0.01)
    assert float((model[4].weight == 0).float().mean()) == pytest.approx(0.2, abs=0.01)


def test_activation_norms_are_comparable_across_layers() -> None:
    # Conv input: ones at 16 positions (2-norm 4, RMS 1); linear input: the pooled ones (1, 1).
    conv, fc = nn.Conv2d(1, 2, 1, bias=False), nn.Linear(2, 2, bias=False)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        fc.weight.fill_(2.0)
    prunelab.prune(model, "activation", 1 / 3, data=[torch.ones(1, 1, 4, 4)])
    assert conv.weight.abs().sum() == 0 and fc.weight.count_nonzero() == 4  # 1·1 < 2·1


def _install_plugin(root, name: str, module: str, source: str) -> None:
    """A minimal installed distribution declaring a ``prunelab.methods`` entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[prunelab.methods]\n{name} = {module}\n")


def test_installed_plugins_register_their_methods(tmp_path, monkeypatch) -> None:
    from prunelab.methods import load_plugins

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # leave the registry as found
    _install_plugin(tmp_path, "cube", "prunelab_cube_plugin", '''
from dataclasses import dataclass
from prunelab.methods.base import UnstructuredMethod, register_method

@register_method("cube-magnitude")
@dataclass
class CubeMagnitude(UnstructuredMethod):
    """|w|^3 (ranks as magnitude does)."""

    def scores(self, model, weights, data):
        return [w.weight.detach().abs() ** 3 for w in weights]
''')
    _install_plugin(tmp_path, "broken", "prunelab_broken_plugin", '''
from dataclasses import dataclass
from prunelab.methods.base import UnstructuredMethod, register_method

@register_method("half-registered")
@dataclass
class Half(UnstructuredMethod):
    """Registered, then its module fails."""

raise ImportError("no")
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plugin 'broken' .* failed to load"):
        loaded = load_plugins()
    assert loaded == ["cube"] and "cube-magnitude" in METHODS
    assert "half-registered" not in METHODS  # a failed plugin leaves nothing behind
    model = nn.Sequential(nn.Linear(4, 4))
    before = model[0].weight.detach().clone()
    prunelab.prune(model, "cube-magnitude", sparsity=0.5)
    kept = model[0].weight != 0
    assert kept.sum() == 8
    assert before[kept].abs().min() > before[~kept].abs().max()
