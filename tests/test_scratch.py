"""Scratch-E/B re-initialise surviving weights as Liu et al.'s official code does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunelab.recoveries.scratch import rescale_to_surviving_fan
from prunelab.sparsity import original_weight, set_mask


def test_surviving_weights_get_the_std_of_the_official_code() -> None:
    # The official code (cifar/weight-level/cifar_E.py) draws a pruned conv's weights from
    # N(0, 2/n) with n = mask.sum() / in_channels, its models' init being N(0, 2/fan_out).
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    mask = torch.rand_like(conv.weight) < 0.1
    set_mask(conv, mask)
    rescale_to_surviving_fan(conv)
    kept = original_weight(conv)[mask]
    n = mask.sum() / conv.in_channels
    assert kept.std().item() == pytest.approx(math.sqrt(2 / n), rel=0.03)


def test_rescale_is_exactly_one_over_root_density_and_skips_empty_layers() -> None:
    layer, empty = nn.Linear(10, 10), nn.Linear(10, 10)
    before = layer.weight.detach().clone()
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :4] = True
    set_mask(layer, mask)
    set_mask(empty, torch.zeros(10, 10))
    empty_before = original_weight(empty).detach().clone()
    rescale_to_surviving_fan(nn.Sequential(layer, empty))
    assert torch.allclose(original_weight(layer), before / math.sqrt(0.4))
    assert torch.equal(original_weight(empty), empty_before)


def test_a_tied_weight_is_scaled_once() -> None:
    embed = nn.Embedding(8, 4)
    head = nn.Linear(4, 8, bias=False)
    head.weight = embed.weight
    before = embed.weight.detach().clone()
    mask = torch.ones(8, 4)
    mask[:, :3] = 0  # density 1/4
    set_mask(embed, mask)
    set_mask(head, mask)
    rescale_to_surviving_fan(nn.ModuleDict({"embed": embed, "head": head}))
    assert torch.allclose(original_weight(embed), before * 2)


def test_strategy_labels_keep_variants_of_one_kind_apart() -> None:
    from prunelab.recoveries import RECOVERIES
    from prunelab.schedules import SCHEDULES

    assert RECOVERIES.get("scratch-b")().label() == "scratch-b"
    assert RECOVERIES.get("scratch-b")(scratch_b_cap=2).label() == "scratch-b(scratch_b_cap=2.0)"
    assert (RECOVERIES.get("scratch-e")(rescale_init=False).label()
            == "scratch-e(rescale_init=False)")
    assert SCHEDULES.get("iterative")(rounds=5).label() == "iterative(rounds=5)"
