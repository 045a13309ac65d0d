"""Mask invariants: exact sparsity, zeros survive training, save/load, make-permanent, removal."""

from __future__ import annotations

import copy
import io

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError, NothingToPruneError
from prunelab.sparsity import get_mask, keep_mask_from_scores, mask_sparsity, prunable_weights


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def prunable_count(model: nn.Module) -> int:
    return sum(w.numel() for w in prunable_weights(model))


def zero_count(model: nn.Module) -> int:
    return sum(int((w.weight == 0).sum()) for w in prunable_weights(model))


sparsities = st.floats(min_value=0.0, max_value=0.99, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(sparsity=sparsities, seed=st.integers(0, 2**16))
def test_global_sparsity_is_exact(sparsity: float, seed: int) -> None:
    model = small_net(seed)
    prunelab.prune(model, "magnitude", sparsity)
    assert zero_count(model) == round(sparsity * prunable_count(model))


@settings(max_examples=30, deadline=None)
@given(sparsity=sparsities, seed=st.integers(0, 2**16))
def test_layer_scope_prunes_each_layer_to_the_target(sparsity: float, seed: int) -> None:
    model = small_net(seed)
    prunelab.prune(model, "random", sparsity, scope="layer", seed=seed)
    for w in prunable_weights(model):
        assert int((w.weight == 0).sum()) == round(sparsity * w.numel())


@settings(max_examples=30, deadline=None)
@given(
    scores=st.lists(st.integers(-3, 3), min_size=1, max_size=60),
    fraction=st.floats(0, 1, allow_nan=False),
)
def test_selection_is_exact_with_ties(scores: list[int], fraction: float) -> None:
    tensor = torch.tensor(scores, dtype=torch.float32)
    k = round(fraction * len(scores))
    keep = keep_mask_from_scores(tensor, k)
    assert int((~keep).sum()) == k
    if 0 < k < len(scores):  # every pruned score is <= every kept score
        assert tensor[~keep].max() <= tensor[keep].min()


optimizers = st.sampled_from(["sgd", "sgd-nesterov", "adam", "adamw", "rmsprop"])


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name.startswith("sgd"):
        return torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=name.endswith("nesterov")
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=0.05, weight_decay=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-1)
    return torch.optim.RMSprop(params, lr=0.01, momentum=0.9, weight_decay=1e-2)


@settings(max_examples=15, deadline=None)
@given(optimizer=optimizers, sparsity=st.floats(0.1, 0.95), steps=st.integers(1, 5))
def test_pruned_weights_stay_zero_through_training(
    optimizer: str, sparsity: float, steps: int
) -> None:
    model = small_net()
    # Momentum built up *before* pruning must not leak into pruned weights afterwards.
    opt = make_optimizer(optimizer, model.parameters())
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    prunelab.prune(model, "magnitude", sparsity)
    pruned = {w.name: (w.weight == 0).clone() for w in prunable_weights(model)}
    opt = make_optimizer(optimizer, model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for w in prunable_weights(model):
        assert torch.all(w.weight[pruned[w.name]] == 0)


@settings(max_examples=15, deadline=None)
@given(sparsity=sparsities, seed=st.integers(0, 1000))
def test_save_load_round_trip(sparsity: float, seed: int) -> None:
    model = small_net(seed)
    prunelab.prune(model, "random", sparsity, seed=seed)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_net(seed + 1)
    prunelab.load_state_dict(fresh, torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, 6, 6)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    for a, b in zip(prunable_weights(model), prunable_weights(fresh), strict=True):
        assert torch.equal(get_mask(a.module), get_mask(b.module))


@settings(max_examples=15, deadline=None)
@given(sparsity=sparsities, seed=st.integers(0, 1000))
def test_make_permanent_equals_masked_forward(sparsity: float, seed: int) -> None:
    model = small_net(seed).eval()
    prunelab.prune(model, "magnitude", sparsity)
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    plain = prunelab.make_permanent(copy.deepcopy(model))
    assert not any("parametrizations" in k for k in plain.state_dict())
    assert all(get_mask(m) is None for m in plain.modules())
    assert torch.equal(plain(x), expected)
    assert zero_count(plain) == zero_count(model)


def test_remove_masks_restores_original_weights() -> None:
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunelab.prune(model, "magnitude", 0.7)
    prunelab.remove_masks(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruning_is_monotone_and_cumulative() -> None:
    model = small_net()
    prunelab.prune(model, "magnitude", 0.5)
    first = {w.name: w.weight == 0 for w in prunable_weights(model)}
    prunelab.prune(model, "random", 0.8, seed=3)  # a different criterion cannot revive weights
    for w in prunable_weights(model):
        assert torch.all((w.weight == 0)[first[w.name]])
    assert mask_sparsity(model) == pytest.approx(0.8, abs=1e-3)


def test_biases_and_batchnorm_are_not_pruned() -> None:
    model = small_net()
    prunelab.prune(model, "magnitude", 0.9)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(int((m.bias == 0).sum()) == 0 for m in layers)
    assert all(get_mask(m, "bias") is None for m in layers)
    assert get_mask(model[1]) is None and int((model[1].weight == 0).sum()) == 0


def test_exclusions_and_overrides() -> None:
    model = small_net()
    prunelab.prune(model, "magnitude", 0.9, exclude_first=True, exclude_last=True,
                   layer_sparsity={"7": 0.25})
    assert get_mask(model[0]) is None and get_mask(model[9]) is None
    assert int((model[7].weight == 0).sum()) == round(0.25 * model[7].weight.numel())
    assert int((model[3].weight == 0).sum()) == round(0.9 * model[3].weight.numel())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_out_of_range_is_a_clear_error(bad) -> None:
    with pytest.raises(InvalidValueError, match=r"\[0, 1\)"):
        prunelab.prune(small_net(), "magnitude", bad)


def test_nothing_prunable_is_a_clear_error() -> None:
    with pytest.raises(NothingToPruneError, match="no prunable layer"):
        prunelab.prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude", 0.5)


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(prunelab.PrunelabError, match="Did you mean 'magnitude'") as info:
        prunelab.prune(small_net(), "magnitud", 0.5)
    assert "random" in str(info.value)


def test_unknown_option_and_pattern_are_clear_errors() -> None:
    with pytest.raises(InvalidValueError, match="has no option 'sead'"):
        prunelab.prune(small_net(), "random", 0.5, sead=1)
    with pytest.raises(InvalidValueError, match="matches no prunable layer"):
        prunelab.prune(small_net(), "magnitude", 0.5, exclude=["features.*"])
    with pytest.raises(InvalidValueError, match="option 'seed' must be int, got 'one'"):
        prunelab.prune(small_net(), "random", 0.5, seed="one")


def test_conv_transpose_and_conv3d_are_prunable() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Conv3d(1, 2, 2), nn.Conv1d(2, 2, 1))
    prunelab.prune(model, "magnitude", 0.5, scope="layer")
    assert all(get_mask(m) is not None for m in model)


def test_make_permanent_on_a_copy_leaves_the_original_masked() -> None:
    model = small_net()
    prunelab.prune(model, "magnitude", 0.5)
    prunelab.make_permanent(copy.deepcopy(model))
    prunelab.remove_masks(copy.deepcopy(model))
    assert mask_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert zero_count(model) == round(0.5 * prunable_count(model))


@settings(max_examples=20, deadline=None)
@given(compression=st.floats(1.0, 20.0))
def test_compression_target_counts_every_parameter(compression: float) -> None:
    from prunelab.sparsity import sparsity_for_compression

    model = small_net()
    torch.nn.init.constant_(model[1].bias, 0.1)  # as after training: no accidental zeros
    prunelab.prune(model, "magnitude", sparsity_for_compression(model, compression))
    m = prunelab.measure(model, torch.zeros(1, 3, 6, 6))
    assert m.compression == pytest.approx(compression, rel=0.01)


def test_unreachable_compression_says_what_is_reachable() -> None:
    from prunelab.sparsity import sparsity_for_compression

    with pytest.raises(InvalidValueError, match="at most"):
        sparsity_for_compression(small_net(), 1000.0)
