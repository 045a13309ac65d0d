"""FLOPs per operation: dense counts by hand, effective counts of masked parameters of any kind,
attention and RNN kernels the counter must see, and speed-ups against an original model."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.metrics import count_flops, measure


def lenet_300_100() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def test_effective_flops_of_a_masked_lenet_300_100_by_hand() -> None:
    model = lenet_300_100()
    prunelab.prune(model, "magnitude", 0.9, layer_sparsity={"5": 0.5})
    nonzero = [int(model[i].weight.count_nonzero()) for i in (1, 3, 5)]
    m = measure(model, torch.zeros(4, 1, 28, 28))
    assert m.macs == 4 * 266_200
    assert m.effective_macs == 4 * sum(nonzero)  # each kept weight: one MAC per sample
    assert [layer.effective_flops for layer in m.layers] == [2 * 4 * n for n in nonzero]
    assert m.theoretical_speedup == pytest.approx(266_200 / sum(nonzero))


def attention(seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(16, 4, batch_first=True).eval()


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = attention()

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_half_pruned_in_proj_halves_exactly_the_in_proj_flops() -> None:
    model, x = SelfAttention(), torch.randn(2, 7, 16)  # batch 2, 7 tokens, width 16
    dense = measure(model, x)
    tokens, width = 2 * 7, 16
    in_proj, scores, out_proj = tokens * 3 * width * width, 2 * 2 * 7 * 7 * width, tokens * 256
    assert dense.macs == in_proj + scores + out_proj
    prunelab.prune(model, "magnitude", 0.5, include=["attn.in_proj_weight"])
    pruned = measure(model, x)
    assert pruned.flops == dense.flops
    assert pruned.effective_macs == in_proj // 2 + scores + out_proj
    layers = {layer.name: layer for layer in pruned.layers}
    # The attention's own row: its in-projection (halved) and the score products (dense); the
    # out-projection, used through its weight only, gets its own row.
    assert layers["attn"].flops == 2 * (in_proj + scores)
    assert layers["attn"].effective_flops == 2 * (in_proj // 2 + scores)
    assert layers["attn.out_proj"].flops == 2 * out_proj
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on after counting


def test_vision_transformer_attention_is_counted_on_cpu_as_on_meta() -> None:
    # The eval fast path and CPU flash attention used to escape the counter (ViTs ~35% low).
    def vit():
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
            num_classes=10)

    tokens, width = 17, 16  # 16 patches + the class token
    per_layer = tokens * 3 * width**2 + 2 * tokens**2 * width + tokens * width**2 \
        + 2 * tokens * 32 * width
    by_hand = 16 * 16 * 3 * 8 * 8 + 2 * per_layer + width * 10
    assert measure(vit(), torch.randn(1, 3, 32, 32)).macs == by_hand
    assert count_flops(vit().to("meta"), torch.zeros(1, 3, 32, 32, device="meta")).flops \
        == 2 * by_hand


def test_lstm_flops_by_hand_and_masked_recurrent_weights() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 8)  # batch 3, 5 steps
    steps = 3 * 5
    macs = steps * 4 * 16 * ((8 + 16) * 2 + (32 + 16) * 2)
    assert measure(lstm, x).macs == macs  # the fused mkldnn kernel is not used while counting
    prunelab.prune(lstm, "magnitude", 0.75, include=["*weight_hh_l0"], scope="layer")
    # The forward direction's recurrent weight (4·16 x 16) loses 3/4 of its MACs at every step.
    assert measure(lstm, x).effective_macs == macs - steps * (3 * 4 * 16 * 16 // 4)
    assert torch.backends.mkldnn.enabled


def test_a_tied_output_layer_counts_with_the_pruned_embedding() -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    tokens = torch.randint(0, 50, (2, 6))
    prunelab.prune(model, "magnitude", 0.8)
    m = measure(model, tokens)
    assert m.macs == 12 * 50 * 8  # the lookup costs nothing, the output layer 12 tokens x 400
    assert m.effective_macs == 12 * 80
    assert m.params == 400 and m.nonzero_params == 80


def test_speedup_and_compression_against_the_original() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    smaller = nn.Sequential(nn.Linear(100, 20), nn.ReLU(), nn.Linear(20, 10))  # channels removed
    x = torch.randn(1, 100)
    assert measure(smaller, x).theoretical_speedup == 1.0  # against itself: nothing to see
    m = measure(smaller, x, reference=original)
    assert m.reference_params == 5560 and m.params == 2230
    assert m.theoretical_speedup == pytest.approx(5500 / 2200)
    assert m.compression == pytest.approx(5560 / 2230)
    assert m.sparsity == pytest.approx(1 - 2230 / 5560)
    assert m.summary()["reference_flops"] == 2 * 5500
    same = [measure(smaller, x, reference=ref).theoretical_speedup
            for ref in (measure(original, x), measure(original, x).summary())]
    assert same == [m.theoretical_speedup] * 2
    timed = measure(smaller, x, reference=original, latency=True, latency_repeats=3)
    assert timed.measured_speedup > 0 and "measured_speedup" in timed.summary()
    with pytest.raises(InvalidValueError, match="reference must be"):
        measure(smaller, x, reference=42)


def test_structured_pruning_reports_its_speedup_against_the_original() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(1, 3, 8, 8)
    pruned = prunelab.prune(copy.deepcopy(original), "l1-filter", 0.5, example_input=x)
    m = measure(pruned, x, reference=original)
    assert m.flops < measure(original, x).flops
    assert m.theoretical_speedup == pytest.approx(measure(original, x).flops / m.flops)


def test_meta_models_have_flops_but_no_measurement() -> None:
    model = nn.Linear(4, 3).to("meta")
    assert count_flops(model, torch.zeros(2, 4, device="meta")).flops == 2 * 2 * 12
    with pytest.raises(InvalidValueError, match="meta device"):
        measure(model, torch.zeros(2, 4, device="meta"))
