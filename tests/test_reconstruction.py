"""OBS / SparseGPT-style reconstruction against dense algebra, and sequential calibration."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.methods.layerwise import as_matrix, from_matrix, input_columns
from prunelab.methods.sparsegpt import SparseGPT, obs_solve


def gram(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Features sharing a common component, as post-ReLU activations with their mean do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g) + 0.3 * torch.randn(n, d, generator=g)


def sequential_obs_reference(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor,
                             damp: float) -> torch.Tensor:
    """Textbook OBS, one column at a time, with explicit inverses (float64): pruning w_q moves
    its error onto the columns not processed yet F by δw = −w_q/[H_F⁻¹]_qq · H_F⁻¹[:, q]."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    cols = w.shape[1]
    for q in range(cols):
        inverse = torch.linalg.inv(h[q:, q:])
        for row in range(w.shape[0]):
            if not keep[row, q]:
                w[row, q:] -= w[row, q] / inverse[0, 0] * inverse[:, 0]
    return w


def test_obs_beats_magnitude_on_reconstruction_error_by_a_large_factor() -> None:
    x = correlated_inputs(1024, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    keep, new = obs_solve(w, gram(x), 0.5, blocksize=16)
    magnitude = w * (w.abs() > w.abs().median())
    assert (~keep).sum() == w.numel() // 2
    obs_error = ((w - new) @ x.T).norm()
    magnitude_error = ((w - magnitude) @ x.T).norm()
    assert magnitude_error > 3 * obs_error


@pytest.mark.parametrize("blocksize", [1, 3, 10])
def test_blocked_solver_equals_dense_sequential_obs(blocksize: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) @ torch.randn(3, 10, generator=g)
    x += 0.3 * torch.randn(200, 10, generator=g)
    w = torch.randn(4, 10, generator=g)
    keep = torch.rand(4, 10, generator=g) > 0.5
    _, new = obs_solve(w, gram(x), 0.5, mask=keep, blocksize=blocksize, damp=0.01)
    expected = sequential_obs_reference(w, gram(x), keep, 0.01) * keep
    torch.testing.assert_close(new.double(), expected, atol=1e-5, rtol=1e-5)


def test_pruning_the_first_columns_gives_the_least_squares_optimum() -> None:
    # With every pruned weight before every kept one, all kept weights stay free: the result is
    # the exact least-squares fit of the dense outputs by the kept inputs.
    x = correlated_inputs(300, 8).double()
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[:, :3] = False
    _, new = obs_solve(w, gram(x.float()), 0.4, mask=keep, blocksize=4, damp=0.0)
    fit = torch.linalg.lstsq(x[:, 3:], x @ w.double().T).solution.T
    torch.testing.assert_close(new[:, 3:].double(), fit, atol=1e-4, rtol=1e-4)


def test_nm_variant_keeps_n_of_m_and_is_independent_of_the_blocksize() -> None:
    x = correlated_inputs(512, 32)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    keep_small, small = obs_solve(w, gram(x), 0.5, nm=(2, 4), blocksize=4)
    keep_whole, whole = obs_solve(w, gram(x), 0.5, nm=(2, 4), blocksize=32)
    assert (keep_small.reshape(-1, 4).sum(1) == 2).all()
    assert torch.equal(keep_small, keep_whole)
    torch.testing.assert_close(small, whole, atol=1e-5, rtol=1e-5)
    magnitude = prunelab.sparsity.nm.nm_keep_mask(w.abs(), 2, 4, dim=1)
    assert ((w - small) @ x.T).norm() < ((w - w * magnitude) @ x.T).norm()


def test_conv_as_matrix_reproduces_the_convolution() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 4, 9, 9)
    columns = input_columns(conv, x)
    out = columns @ as_matrix(conv, conv.weight).T + conv.bias
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(from_matrix(conv, as_matrix(conv, conv.weight), conv.weight), conv.weight)


@dataclass
class Recording(SparseGPT):
    """SparseGPT that remembers the Gram matrix each layer was solved with."""

    seen: list | None = None

    def solve(self, weight, gram, sparsity, nm, pruned):
        self.seen.append(gram.clone())
        return super().solve(weight, gram, sparsity, nm, pruned)


def test_sequential_calibration_feeds_pruned_inputs_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    dense = copy.deepcopy(model)
    data = [torch.randn(64, 16) for _ in range(3)]
    method = Recording(seen=[])
    prunelab.prune(model, method, 0.6, data=data)
    pruned_inputs = torch.cat([model[1](model[0](x)) for x in data]).detach()
    dense_inputs = torch.cat([dense[1](dense[0](x)) for x in data]).detach()
    torch.testing.assert_close(method.seen[1], gram(pruned_inputs), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(method.seen[1], gram(dense_inputs), atol=1e-2)


def test_layers_are_pruned_in_forward_order_not_module_order() -> None:
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.second, self.first = nn.Linear(8, 4), nn.Linear(4, 8)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    model = Reversed()
    method = Recording(seen=[])
    prunelab.prune(model, method, 0.5, data=[torch.randn(32, 4)])
    assert [g.shape[0] for g in method.seen] == [4, 8]


def test_sparsegpt_on_a_small_cnn_reconstructs_better_than_magnitude() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 10))
    data = [torch.randn(32, 8, 6, 6) + 1 for _ in range(2)]
    dense = copy.deepcopy(model)
    for pattern in (None, "2:4"):
        solved = prunelab.prune(copy.deepcopy(dense), "sparsegpt", 0.5, data=data, nm=pattern)
        magnitude = prunelab.prune(copy.deepcopy(dense), "magnitude", 0.5, scope="layer",
                                   nm=pattern)
        x = data[0]
        for layer in (solved[0], solved[3]):
            assert (layer.weight == 0).float().mean() == 0.5
        error = (solved(x) - dense(x)).norm()
        assert error < (magnitude(x) - dense(x)).norm()
    groups = solved[0].weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups != 0).sum(1) == 2).all()


def test_existing_masks_stay_pruned_and_training_keeps_them() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    prunelab.prune(layer, "magnitude", 0.3)
    before = layer.parametrizations.weight[0].mask.clone()
    prunelab.prune(layer, "sparsegpt", 0.6, data=[torch.randn(40, 12)])
    mask = layer.parametrizations.weight[0].mask
    assert (mask[before == 0] == 0).all() and (mask == 0).float().mean() == pytest.approx(0.6, 0.02)
    assert torch.equal(layer.weight == 0, mask == 0)


def test_solver_bad_input_gets_one_line() -> None:
    data = [torch.randn(4, 8)]
    with pytest.raises(InvalidValueError, match=r"Embedding.*exclude"):
        prunelab.prune(nn.Sequential(nn.Embedding(10, 8)), "sparsegpt", 0.5,
                       data=[torch.randint(0, 10, (4,))])
    with pytest.raises(PrunelabError, match="calibration data"):
        prunelab.prune(nn.Linear(8, 4), "sparsegpt", 0.5)
    with pytest.raises(InvalidValueError, match="multiple of M"):
        prunelab.prune(nn.Linear(8, 4), "sparsegpt", 0.5, data=data, nm="2:4", blocksize=6)
    with pytest.raises(InvalidValueError, match=r"'0'.*multiple of 4"):
        prunelab.prune(nn.Sequential(nn.Linear(6, 4)), "sparsegpt", 0.5, data=[torch.randn(4, 6)],
                       nm="2:4")
    with pytest.raises(InvalidValueError, match=r"groups=2"):
        prunelab.prune(nn.Conv2d(4, 4, 3, groups=2), "sparsegpt", 0.5,
                       data=[torch.randn(2, 4, 5, 5)])


def test_a_layer_too_wide_for_memory_gets_the_estimate_and_a_block_count() -> None:
    model = nn.Sequential(nn.Linear(4096, 8))
    with pytest.raises(InvalidValueError) as error:
        prunelab.prune(model, "sparsegpt", 0.5, data=[torch.randn(2, 4096)], max_memory_gb=0.1)
    message = str(error.value)
    assert "'0'" in message and "GiB" in message and "4096x4096" in message
    blocks = int(message.split("input_blocks=")[1].split(" ")[0])
    prunelab.prune(model, "sparsegpt", 0.5, data=[torch.randn(64, 4096)], max_memory_gb=0.1,
                   input_blocks=blocks)  # the advice works
    assert (model[0].weight == 0).float().mean() == 0.5


def test_input_blocks_solve_each_block_with_its_own_hessian() -> None:
    x = correlated_inputs(256, 16)
    layer = nn.Linear(16, 4, bias=False)
    w = layer.weight.detach().clone()
    prunelab.prune(layer, "sparsegpt", 0.5, data=[x], input_blocks=2, blocksize=4)
    for start in (0, 8):
        part = slice(start, start + 8)
        _, expected = obs_solve(w[:, part], gram(x[:, part]), 0.5, blocksize=4)
        torch.testing.assert_close(layer.weight[:, part].detach(), expected, atol=1e-5,
                                   rtol=1e-4)
    assert F.mse_loss(layer(x), x @ w.T) > 0  # pruned, not the dense layer


def test_all_unsupported_tensors_are_named_at_once_with_the_exclusion() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Embedding(8, 8))
    with pytest.raises(InvalidValueError, match=r"exclude=\['0', '2'\]"):
        prunelab.prune(model, "sparsegpt", 0.5, data=[torch.randint(0, 8, (4,))])


def test_weights_pruned_before_stay_pruned_beyond_the_target() -> None:
    w = torch.randn(4, 8)
    pruned = torch.zeros(4, 8, dtype=torch.bool)
    pruned[:, :6] = True  # 75% already pruned, target 50%
    for nm in (None, (2, 4)):
        keep, new = obs_solve(w, gram(correlated_inputs(64, 8)), 0.5, nm=nm, pruned=pruned)
        assert not keep[pruned].any() and (new[pruned] == 0).all()


class CrossAttention(nn.Module):
    """One MultiheadAttention (query from ``x``, keys and values from a context) and a head."""

    def __init__(self, e: int = 8, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, 3)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x, context = batch[:, :4], batch[:, 4:]
        out, _ = self.attention(x, context, context, need_weights=False)
        return self.head(out)


def heads_output(attention: nn.MultiheadAttention, q: torch.Tensor,
                 kv: torch.Tensor) -> torch.Tensor:
    """The heads' concatenated outputs (out_proj's input), from the attention weights torch
    returns per head and the value projection: softmax(QKᵀ/√d) V, head by head."""
    e, heads = attention.embed_dim, attention.num_heads
    _, weights = attention(q, kv, kv, need_weights=True, average_attn_weights=False)
    v = kv @ attention.in_proj_weight[2 * e:].T + attention.in_proj_bias[2 * e:]
    v = v.view(*v.shape[:2], heads, e // heads).transpose(1, 2)  # batch, heads, keys, d
    return (weights @ v).transpose(1, 2).reshape(*q.shape[:2], e)


def test_sparsegpt_prunes_attention_projections_each_on_the_input_its_rows_multiply() -> None:
    torch.manual_seed(0)
    model = CrossAttention().eval()
    dense = copy.deepcopy(model)
    batch = torch.randn(64, 10, 8) + 0.5
    data = [(batch, torch.zeros(64, dtype=torch.long))]
    solved = prunelab.prune(copy.deepcopy(dense), "sparsegpt", 0.5, data=data,
                            exclude=["head"])
    attention, reference = solved.attention, dense.attention
    for weight in (attention.in_proj_weight, attention.out_proj.weight):
        assert (weight == 0).float().mean() == 0.5
    # Each part of the fused in_proj is solved on its own input: queries on x, keys and values
    # on the context (cross-attention: different tensors).
    x, context = batch[:, :4].reshape(-1, 8), batch[:, 4:].reshape(-1, 8)
    w, e = reference.in_proj_weight.detach(), 8
    for part, inputs in ((slice(0, e), x), (slice(e, 2 * e), context),
                         (slice(2 * e, 3 * e), context)):
        _, expected = obs_solve(w[part], gram(inputs), 0.5)
        torch.testing.assert_close(attention.in_proj_weight[part].detach(), expected,
                                   atol=1e-5, rtol=1e-4)
    # out_proj (whose forward torch never calls) is solved on the heads' outputs of the
    # already-pruned projections, computed here independently from the attention weights.
    with torch.no_grad():
        values = heads_output(attention, batch[:, :4], batch[:, 4:]).reshape(-1, e)
    _, expected = obs_solve(reference.out_proj.weight.detach(), gram(values), 0.5)
    torch.testing.assert_close(attention.out_proj.weight.detach(), expected, atol=1e-4,
                               rtol=1e-3)
    magnitude = prunelab.prune(copy.deepcopy(dense), "magnitude", 0.5, scope="layer",
                               exclude=["head"])
    with torch.no_grad():
        error = (solved(batch) - dense(batch)).norm()
        assert error < (magnitude(batch) - dense(batch)).norm()
