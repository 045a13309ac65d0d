"""Removal is never silently wrong: the smaller model must compute what the masked one does."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.metrics import count_parameters
from prunelab.structured import apply_plan, structure_of
from prunelab.structured.graph import removed_so_far


class Shuffled(nn.Module):
    """A channel shuffle (view, transpose, reshape) between two convolutions: the dependency
    graph maps channel i of ``a`` to input i of ``b``, which the shuffle moved elsewhere."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.b(y)).mean((2, 3)))


def test_a_channel_shuffle_is_refused_by_name_and_the_fix_works() -> None:
    torch.manual_seed(0)
    model, x = Shuffled().eval(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(InvalidValueError,
                       match=r"layer 'a' breaks.*computes something else.*exclude=\['a'\]"):
        prunelab.prune(model, "l1-filter", 0.5, example_input=x)
    assert model.a.out_channels == 8 and not structure_of(model)  # left as it was
    with torch.no_grad():
        assert torch.equal(model(x), before)
    prunelab.prune(model, "l1-filter", 0.5, example_input=x, exclude=["a"])
    assert (model.a.out_channels, model.b.out_channels) == (8, 3)


def _masked_by_hand(model: nn.Sequential, idxs: list[int], x: torch.Tensor) -> torch.Tensor:
    """Conv -> BN -> ReLU -> conv with channels ``idxs`` zeroed, computed without prunelab."""
    conv, bn, _, reader = model
    y = torch.relu(bn(conv(x)))
    y[:, idxs] = 0
    return reader(y)


def test_a_correct_removal_equals_the_masked_model() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3))
    model[1].running_mean.uniform_(-1, 1)  # so a zeroed conv filter alone would not be zero
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = _masked_by_hand(model, [1, 4, 6], x)
        apply_plan(model, {"0": [1, 4, 6]}, x)
        assert model[0].out_channels == 5 and model[3].in_channels == 5
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


class Grouped(nn.Module):
    """A 1x1 conv feeding a grouped conv (4 groups of 4), as in RegNet and ResNeXt."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.g, self.fc = nn.Conv2d(16, 16, 3, groups=4), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.g(torch.relu(self.bn(self.a(x)))).mean((2, 3)))


def test_grouped_convolutions_lose_the_same_positions_in_every_block() -> None:
    torch.manual_seed(2)
    model = Grouped().eval()
    prunelab.prune(model, "l2-channel", 0.5, scope="layer", example_input=torch.randn(1, 3, 8, 8))
    assert model.a.out_channels == 8 and model.g.in_channels == 8 and model.g.groups == 4
    plan = structure_of(model)[0]["plan"]
    positions = [sorted(i % 4 for i in plan["a"] if i // 4 == block) for block in range(4)]
    assert all(p == positions[0] and len(p) == 2 for p in positions)


def test_nan_filters_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].weight[2, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidValueError, match=r"layer '0' as NaN"):
        prunelab.prune(model, "l1-filter", 0.5, example_input=torch.randn(1, 3, 8, 8))
    assert model[0].out_channels == 8


def test_slimming_needs_batchnorm_and_prunes_only_channels_that_have_one() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(InvalidValueError, match=r"slimming.*cannot prune any.*BatchNorm"):
        prunelab.prune(plain, "slimming", 0.5, example_input=torch.randn(1, 3, 8, 8))
    mixed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.warns(UserWarning, match="slimming pruned 1 of 2 channel groups"):
        prunelab.prune(mixed, "slimming", 0.25, example_input=torch.randn(1, 3, 10, 10))
    assert (mixed[0].out_channels, mixed[3].out_channels) == (6, 8)  # 25% of 8


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_repeated_channel_pruning_goes_to_the_target_instead_of_compounding(scope) -> None:
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20").eval()
    once = copy.deepcopy(model)
    prunelab.prune(model, "l2-channel", 0.3, scope=scope, round_to=1)
    first = sum(removed_so_far(model).values())
    prunelab.prune(model, "l2-channel", 0.5, scope=scope, round_to=1)
    prunelab.prune(once, "l2-channel", 0.5, scope=scope, round_to=1)
    # 50% of the original channels, as one call to 0.5 removes; not 0.3 + 0.5 * 0.7 = 65%
    assert sum(removed_so_far(model).values()) == sum(removed_so_far(once).values()) > first
    if scope == "layer":
        assert _widths(model) == _widths(once)
    with pytest.warns(UserWarning, match="already pruned"):
        prunelab.prune(model, "l2-channel", 0.4, scope=scope, round_to=1)
    assert sum(removed_so_far(model).values()) == sum(removed_so_far(once).values())


def test_repeated_targets_are_relative_to_the_original_model() -> None:
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20").eval()
    dense = count_parameters(model)[0]
    # exact counts: with the automatic multiple the overshoot depends on the machine's
    prunelab.prune(model, "l2-channel", compression=1.5, round_to=1)
    prunelab.prune(model, "l2-channel", compression=2.0, round_to=1)
    assert dense / count_parameters(model)[0] == pytest.approx(2.0, rel=0.02)
    assert structure_of(model)[0]["reference"]["params"] == dense


def test_repeated_unstructured_pruning_goes_to_the_target() -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    prunelab.prune(model, "magnitude", 0.3)
    prunelab.prune(model, "magnitude", 0.5)
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros == round(0.5 * (20 * 30 + 30 * 10))


def test_thinet_says_what_it_reached_when_it_skips_groups() -> None:
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20").eval()
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    with pytest.warns(UserWarning, match=r"thinet pruned 9 of \d+ channel groups .*one plain "
                                         r"layer.*removed 30% of their channels, \d+% of all"):
        prunelab.prune(model, "thinet", 0.3, data=data, samples=200, batches=1, round_to=1)


class Normed(nn.Module):
    """A LayerNorm over channels (ConvNeXt-like): removing channels changes its statistics."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
        self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.norm(self.a(x)))))


def test_channels_normalised_together_stay_whole_and_the_rest_is_pruned() -> None:
    model = Normed().eval()
    with pytest.warns(UserWarning, match=r"1 channel group.*'a'.*LayerNorm 'norm'"):
        prunelab.prune(model, "l2-channel", 0.5, example_input=torch.randn(4, 6))
    assert (model.a.out_features, model.b.out_features) == (8, 8)


def test_an_unmaskable_plan_is_refused_before_anything_changes() -> None:
    model = Normed().eval()
    with pytest.raises(InvalidValueError, match=r"layer 'a'.*LayerNorm 'norm'"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, {"a": [0, 1]}, torch.randn(4, 6))
    assert model.a.out_features == 8 and model.norm.normalized_shape == (8,)


TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
               "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1",
               "googlenet", "convnext_tiny", "vit_b_16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_are_channel_pruned_and_checked(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, *((224, 224) if name == "vit_b_16" else (64, 64)))
    params = count_parameters(model)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunelab.prune(model, "l2-channel", 0.3, example_input=x)
    check = structure_of(model)[-1]["check"]  # the removal check ran and passed
    assert check["max_diff"] <= 1e-4 * check["scale"] + 1e-6
    assert count_parameters(model)[0] < 0.9 * params
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    for attention in (m for m in model.modules() if isinstance(m, nn.MultiheadAttention)):
        # heads are not pruned: the projection width is the residual width (a LayerNorm's)
        assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (768, 12, 64)


def test_a_reloaded_model_keeps_its_reference_for_later_targets(tmp_path) -> None:
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20").eval()
    dense = count_parameters(model)[0]
    prunelab.prune(model, "l2-channel", compression=1.5, round_to=1)
    prunelab.save_checkpoint(tmp_path / "a.pt", model, model_name="resnet20")
    loaded, _ = prunelab.load_checkpoint(tmp_path / "a.pt")
    assert structure_of(loaded)[0]["reference"]["params"] == dense
    prunelab.prune(loaded, "l2-channel", compression=2.0, round_to=1)
    assert dense / count_parameters(loaded)[0] == pytest.approx(2.0, rel=0.02)
