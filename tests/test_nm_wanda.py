"""N:M sparsity for every unstructured criterion, and Wanda's per-row comparison."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.sparsity.nm import nm_keep_mask, row_keep_mask

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]


def nonzeros_per_group(weight: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    return (weight.movedim(dim, -1).reshape(-1, m) != 0).sum(1)


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), rows=st.integers(1, 6), groups=st.integers(1, 5),
       seed=st.integers(0, 10_000), ties=st.booleans())
def test_nm_mask_keeps_exactly_n_of_every_m(pattern, rows, groups, seed, ties) -> None:
    n, m = pattern
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    if ties:  # many equal scores: the count must still be exact
        scores = scores.round()
    keep = nm_keep_mask(scores, n, m, dim=1)
    assert (keep.reshape(-1, m).sum(1) == n).all()
    kept, dropped = scores.reshape(-1, m), ~keep.reshape(-1, m)
    # every kept score is at least every pruned score of its group
    low_kept = torch.where(keep.reshape(-1, m), kept, torch.inf).min(1).values
    high_dropped = torch.where(dropped, kept, -torch.inf).max(1).values
    assert (low_kept >= high_dropped).all()


@settings(max_examples=15, deadline=None)
@given(method=st.sampled_from(["magnitude", "random", "taylor", "activation", "wanda"]),
       pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 1000))
def test_every_unstructured_criterion_takes_nm(method, pattern, seed) -> None:
    n, m = pattern
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    data = [(torch.randn(6, 8, 6, 6), torch.randint(0, 8, (6,)))]
    prunelab.prune(model, method, 1 - n / m, data=data, nm=f"{n}:{m}")
    # conv groups run along input channels at each kernel position
    assert (nonzeros_per_group(model[0].weight.permute(0, 2, 3, 1), m, dim=3) == n).all()
    assert (nonzeros_per_group(model[3].weight, m) == n).all()


def test_nm_keeps_the_best_scores_of_each_group_by_hand() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 0.5], [2.0, 0.1, -0.2, 5.0]]))
    prunelab.prune(layer, "magnitude", 0.5, nm="2:4")
    assert (layer.weight != 0).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_transposed_conv_groups_run_along_input_channels() -> None:
    layer = nn.ConvTranspose2d(8, 3, 2)
    prunelab.prune(layer, "magnitude", 0.5, nm="2:4")
    assert (nonzeros_per_group(layer.weight, 4, dim=0) == 2).all()


def test_nm_refuses_a_width_that_m_does_not_divide_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(InvalidValueError, match=r"'2'.*multiple of 4.*6"):
        prunelab.prune(model, "magnitude", 0.5, nm="2:4")
    prunelab.prune(model, "magnitude", 0.5, nm="2:4", exclude=["2"])  # the fix it names
    assert (nonzeros_per_group(model[0].weight, 4) == 2).all()


@pytest.mark.parametrize("options, match", [
    ({"nm": "4:2"}, "0 < N < M"), ({"nm": "two:four"}, "N:M"),
    ({"nm": "1:4"}, r"sparsity=0\.75"),
])
def test_nm_bad_input_gets_one_line(options, match) -> None:
    with pytest.raises(InvalidValueError, match=match):
        prunelab.prune(nn.Linear(8, 2), "magnitude", 0.5, **options)


def test_nm_refuses_other_targets_and_layer_overrides() -> None:
    with pytest.raises(InvalidValueError, match=r"sparsity=0\.5"):
        prunelab.prune(nn.Linear(8, 2), "magnitude", compression=2.0, nm="2:4")
    with pytest.raises(InvalidValueError, match="layer_sparsity"):
        prunelab.prune(nn.Linear(8, 2), "magnitude", 0.5, nm="2:4", layer_sparsity={"": 0.3})


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), width=st.integers(1, 20), sparsity=st.floats(0, 0.95),
       seed=st.integers(0, 1000))
def test_row_mask_prunes_the_same_count_in_every_row(rows, width, sparsity, seed) -> None:
    scores = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).round()
    keep = row_keep_mask(scores, sparsity, dim=0)
    assert ((~keep).sum(1) == round(sparsity * width)).all()


def test_wanda_prunes_the_same_count_in_every_row_and_weighs_by_input_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    x = torch.randn(16, 3, 6, 6) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    prunelab.prune(model, "wanda", 0.6, data=[x])
    conv_pruned = (model[0].weight == 0).flatten(1).sum(1)
    assert (conv_pruned == round(0.6 * 27)).all()
    assert ((model[3].weight == 0).sum(1) == round(0.6 * 96)).all()
    # channel 1's inputs are 100x channel 2's: Wanda keeps far more of its weights
    kept = (model[0].weight != 0).sum((0, 2, 3))
    assert kept[1] > kept[2]


def test_wanda_differs_from_activation_only_in_the_comparison_group() -> None:
    def layer() -> nn.Linear:
        made = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            made.weight.copy_(torch.tensor([[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                            [1, 2, 3, 4, 5, 6]]))
        return made

    x = torch.ones(4, 6)
    wanda = prunelab.prune(layer(), "wanda", 0.5, data=[x])
    activation = prunelab.prune(layer(), "activation", 0.5, data=[x], scope="layer")
    assert ((wanda.weight == 0).sum(1) == 3).all()  # per row
    assert (activation.weight[1] == 0).all()  # activation ranks the whole layer: row 1 emptied
