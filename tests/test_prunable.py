"""Prunable parameters beyond Linear/Conv: Embedding, attention, RNNs, tied and custom tensors."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.methods import METHODS
from prunelab.metrics import count_parameters
from prunelab.recoveries import rewind_weights
from prunelab.sparsity import (
    get_mask,
    mask_sparsity,
    masked_parameters,
    prunable_parameter_names,
    prunable_weights,
    register_prunable,
)


class Mixed(nn.Module):
    """Token embedding -> attention (packed and split projections) -> LSTM -> GRU -> Linear."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(width, 2, kdim=6, vdim=6, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.lstm = nn.LSTM(width, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        memory = torch.ones(x.shape[0], 3, 6)
        x = self.norm(x + self.cross(x, memory, memory, need_weights=False)[0])
        x, _ = self.gru(self.lstm(x)[0])
        return self.head(x[:, -1])


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed()


TOKENS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
EXPECTED_NAMES = [
    "emb", "attn.in_proj_weight", "attn.out_proj", "cross.q_proj_weight", "cross.k_proj_weight",
    "cross.v_proj_weight", "cross.out_proj",
    *[f"lstm.weight_{k}_l{i}{r}" for i in (0, 1) for r in ("", "_reverse") for k in ("ih", "hh")],
    "gru.weight_ih_l0", "gru.weight_hh_l0", "head",
]


def test_default_prunable_parameters_of_every_kind() -> None:
    model = mixed()
    weights = prunable_weights(model)
    assert [w.name for w in weights] == EXPECTED_NAMES
    assert not any("bias" in w.param for w in weights)  # biases and LayerNorm never
    assert prunable_parameter_names(model.norm) == []
    assert prunable_parameter_names(nn.EmbeddingBag(5, 3)) == ["weight"]
    assert prunable_parameter_names(nn.LSTM(3, 4, proj_size=2)) == [
        "weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]


@settings(max_examples=15, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 1000),
       method=st.sampled_from(["magnitude", "random"]))
def test_global_sparsity_is_exact_on_every_kind(sparsity: float, seed: int, method: str) -> None:
    model = mixed(seed)
    prunelab.prune(model, method, sparsity)
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights)
    assert sum(int((w.weight == 0).sum()) for w in weights) == round(sparsity * total)


def test_masks_reach_the_forward_of_every_kind() -> None:
    model = mixed().eval()
    prunelab.prune(model, "magnitude", 0.6, scope="layer")
    masked = {(n, p) for n, _, p in masked_parameters(model)}
    assert ("attn", "in_proj_weight") in masked and ("lstm", "weight_hh_l1_reverse") in masked
    expected = model(TOKENS)
    # The same network with the zeros written into plain parameters gives the same output.
    plain = mixed().eval()
    with torch.no_grad():
        for w, target in zip(prunable_weights(model), prunable_weights(plain), strict=True):
            target.original.copy_(w.weight)
        unmasked = dict(model.named_parameters())
        for name, q in plain.named_parameters():
            if name in unmasked:  # biases, norms (masked tensors are under parametrizations.)
                q.copy_(unmasked[name])
    assert torch.allclose(plain(TOKENS), expected, atol=1e-6)
    assert not torch.allclose(mixed().eval()(TOKENS), expected)  # the masks did change it
    baked = prunelab.make_permanent(copy.deepcopy(model))  # a masked RNN that ran copies
    again = copy.deepcopy(baked)  # and so does a baked one before its next forward
    assert not masked_parameters(baked) and torch.equal(baked(TOKENS), expected)
    assert torch.equal(again(TOKENS), expected)


def test_masked_rnn_and_attention_stay_pruned_through_training() -> None:
    model = mixed()
    prunelab.prune(model, "magnitude", 0.7)
    zeros = {w.name: (w.weight == 0).clone() for w in prunable_weights(model)}
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(TOKENS), torch.tensor([1, 2])).backward()
        opt.step()
    for w in prunable_weights(model):
        assert torch.all(w.weight[zeros[w.name]] == 0), w.name


def test_checkpoint_round_trip_into_a_fresh_model(tmp_path) -> None:
    model = mixed(1).eval()
    prunelab.prune(model, "random", 0.5, seed=3)
    path = prunelab.save_checkpoint(tmp_path / "mixed.pt", model)
    fresh, _ = prunelab.load_checkpoint(path, mixed(2))
    fresh.eval()
    assert torch.equal(fresh(TOKENS), model(TOKENS))
    for a, b in zip(prunable_weights(model), prunable_weights(fresh), strict=True):
        assert torch.equal(a.mask, b.mask), a.name
    prunelab.remove_masks(fresh)
    assert not masked_parameters(fresh)


def test_rewind_restores_snapshot_under_masks_of_every_kind() -> None:
    model = mixed()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    prunelab.prune(model, "magnitude", 0.5)
    masks = {w.name: w.mask.clone() for w in prunable_weights(model)}
    rewind_weights(model, snapshot)
    for w, reference in zip(prunable_weights(model), prunable_weights(mixed()), strict=True):
        assert torch.equal(w.mask, masks[w.name])
        assert torch.equal(w.weight, reference.weight * masks[w.name]), w.name


def test_root_module_masks_round_trip() -> None:
    # A model that is itself one attention layer: mask keys have no module prefix.
    model = nn.MultiheadAttention(4, 2)
    prunelab.prune(model, "magnitude", 0.5)
    assert "parametrizations.in_proj_weight.0.mask" in model.state_dict()
    fresh = nn.MultiheadAttention(4, 2)
    prunelab.load_state_dict(fresh, model.state_dict())
    assert torch.equal(get_mask(fresh, "in_proj_weight"), get_mask(model, "in_proj_weight"))


def test_patterns_match_parameter_names() -> None:
    model = mixed()
    prunelab.prune(model, "magnitude", 0.5, exclude=["lstm.weight_hh*", "emb"],
                   layer_sparsity={"*.in_proj_weight": 0.25})
    assert get_mask(model.lstm, "weight_hh_l0") is None and get_mask(model.emb) is None
    assert get_mask(model.lstm, "weight_ih_l1") is not None
    in_proj = model.attn.in_proj_weight
    assert int((in_proj == 0).sum()) == round(0.25 * in_proj.numel())


# --- tied weights -------------------------------------------------------------------------


class TiedLM(nn.Module):
    """A GPT's tying in miniature: the token embedding is also the output layer."""

    def __init__(self, vocab: int = 7, width: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def tied(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM()


def test_a_tied_tensor_is_listed_once_and_masked_in_every_holder() -> None:
    model = tied().eval()
    weights = prunable_weights(model)
    assert [w.name for w in weights] == ["emb", "mix"]
    assert weights[0].names == ("emb", "head")
    prunelab.prune(model, "magnitude", 0.5, scope="layer")
    zeros = model.emb.weight == 0
    assert int(zeros.sum()) == 14 and torch.equal(model.head.weight == 0, zeros)
    # The forward sees the pruned tensor in both places.
    tokens = torch.tensor([[0, 3, 6]])
    pruned = model.emb.weight.detach()
    hidden = torch.tanh(model.mix(pruned[tokens]))
    assert torch.allclose(model(tokens), hidden @ pruned.T)
    # Counting counts the tensor once.
    total, nonzero = count_parameters(model)
    assert total == 7 * 4 + 4 * 4 + 4
    assert nonzero == total - 14 - int((model.mix.weight == 0).sum())
    assert mask_sparsity(model) == pytest.approx((14 + 8) / (28 + 16))
    # Baking keeps the tie.
    baked = prunelab.make_permanent(copy.deepcopy(model))
    assert baked.head.weight is baked.emb.weight and torch.equal(baked.emb.weight, pruned)


def test_tied_tensor_patterns_use_any_holder_name() -> None:
    model = tied()
    prunelab.prune(model, "magnitude", 0.5, exclude=["head"])
    assert get_mask(model.emb) is None and get_mask(model.head) is None
    assert get_mask(model.mix) is not None
    model = tied()
    prunelab.prune(model, "magnitude", 0.5, exclude_last=True)  # head is the last layer
    assert get_mask(model.head) is None and get_mask(model.mix) is not None


def test_tied_masks_survive_a_state_dict_round_trip() -> None:
    model = tied()
    prunelab.prune(model, "random", 0.5)
    fresh = tied(1)
    prunelab.load_state_dict(fresh, model.state_dict())
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_taylor_sums_the_gradient_over_every_holder() -> None:
    model = tied()
    prunelab.prune(model, "magnitude", 0.25)  # masked: each holder computes its own product
    tokens, labels = torch.tensor([[0, 3, 6], [1, 2, 5]]), torch.tensor([[1, 4, 2], [0, 6, 3]])

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, 7), y.reshape(-1), reduction="sum")

    plain = prunelab.make_permanent(copy.deepcopy(model))
    loss_fn(plain(tokens), labels).backward()
    expected = (plain.emb.weight * plain.emb.weight.grad / 2).abs()
    method = METHODS.get("taylor").create(loss=loss_fn)
    scores = method.scores(model, prunable_weights(model), [(tokens, labels)])
    assert torch.allclose(scores[0], expected.detach(), atol=1e-6)


# --- custom modules -----------------------------------------------------------------------


class GatedLinear(nn.Module):
    """y = (W x) * sigmoid(G x): two weight matrices, neither called ``weight`` alone."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.value_weight = nn.Parameter(torch.randn(m, n))
        self.gate_weight = nn.Parameter(torch.randn(m, n))
        self.bias = nn.Parameter(torch.zeros(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x @ self.value_weight.T
        return value * torch.sigmoid(x @ self.gate_weight.T + self.bias)


def test_a_custom_module_declares_its_prunable_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GatedLinear(6, 5), nn.Linear(5, 2))
    assert [w.name for w in prunable_weights(model)] == ["1"]  # unregistered: not prunable
    register_prunable(GatedLinear, ["value_weight", "gate_weight"])
    names = [w.name for w in prunable_weights(model)]
    assert names == ["0.value_weight", "0.gate_weight", "1"]
    prunelab.prune(model, "magnitude", 0.5, scope="layer")
    gated = model[0]
    assert int((gated.value_weight == 0).sum()) == 15 and int((gated.gate_weight == 0).sum()) == 15
    assert int((gated.bias == 0).sum()) == 5  # untouched: zeros from init only
    m = prunelab.measure(model, torch.zeros(1, 6))
    assert m.macs == 2 * 6 * 5 + 5 * 2 and m.effective_macs == 15 + 15 + 5
    with pytest.raises(InvalidValueError, match=r"'0\.value_weight'.*exclude"):
        prunelab.prune(model, "activation", 0.6, data=[torch.randn(3, 6)])


def test_a_bad_registration_is_a_clear_error() -> None:
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.ones(2, 2))

    with pytest.raises(InvalidValueError, match="list of parameter names"):
        register_prunable(Odd, "kernel")
    register_prunable(Odd, ["kernal"])
    with pytest.raises(InvalidValueError, match="no such tensor"):
        prunable_weights(nn.Sequential(Odd()))
    register_prunable(Odd, [])
    with pytest.raises(prunelab.PrunelabError, match="no prunable layer"):
        prunable_weights(nn.Sequential(Odd()))


# --- the activation criterion on each kind ------------------------------------------------


def test_activation_weighs_embedding_rows_by_token_frequency() -> None:
    emb = nn.Embedding(4, 2)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    tokens = torch.tensor([[0, 0, 0, 1, 1, 2, 0, 1]])  # frequencies 4, 3, 1, 0 of 8
    scores = METHODS.get("activation")().scores(emb, prunable_weights(emb), [tokens])[0]
    expected = torch.tensor([4.0, 3.0, 1.0, 0.0]).div(8).sqrt().unsqueeze(1).expand(4, 2)
    assert torch.allclose(scores, expected)
    prunelab.prune(emb, "activation", 0.5, data=[tokens])
    assert emb.weight[:2].count_nonzero() == 4 and emb.weight[2:].count_nonzero() == 0


def test_activation_reads_query_key_value_for_their_rows_of_in_proj() -> None:
    attn = nn.MultiheadAttention(2, 1, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight.fill_(1.0)
    # Query features RMS (1, 2); key (3, 4) over 2 tokens; value (5, 6) over 2 tokens.
    q = torch.tensor([[[1.0, 2.0]]])
    k = torch.tensor([[[3.0, 4.0], [-3.0, 4.0]]])
    v = torch.tensor([[[5.0, -6.0], [5.0, 6.0]]])
    method = METHODS.get("activation")()
    weights = [w for w in prunable_weights(attn) if w.param == "in_proj_weight"]
    hooked = _CallWith(attn, q, k, v)
    scores = method.scores(hooked, weights, [torch.zeros(1)])[0]
    rms = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.allclose(scores, rms.repeat_interleave(2, dim=0))


class _CallWith(nn.Module):
    """Calls an attention layer with fixed query, key and value (the batch is ignored)."""

    def __init__(self, attn: nn.MultiheadAttention, q, k, v):
        super().__init__()
        self.attn, self.q, self.k, self.v = attn, q, k, v

    def forward(self, _):
        return self.attn(self.q, key=self.k, value=self.v, need_weights=False)[0]


def test_activation_weighs_rnn_input_weights_by_the_input_sequence() -> None:
    rnn = nn.GRU(3, 2, batch_first=True)
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1.0)
    x = torch.tensor([[[1.0, 0.0, 3.0], [1.0, 2.0, -3.0]]])  # RMS per feature: 1, √2, 3
    weight = [w for w in prunable_weights(rnn) if w.param == "weight_ih_l0"]
    scores = METHODS.get("activation")().scores(rnn, weight, [x])[0]
    assert torch.allclose(scores, torch.tensor([1.0, 2**0.5, 3.0]).expand(6, 3))


def test_activation_refuses_weights_whose_input_it_cannot_see() -> None:
    data = [TOKENS]
    with pytest.raises(InvalidValueError, match=r"'lstm.weight_hh_l0'.*recurrent state.*exclude"):
        prunelab.prune(mixed(), "activation", 0.5, data=data)
    with pytest.raises(InvalidValueError, match=r"'lstm.weight_ih_l1'.*layer below"):
        prunelab.prune(mixed(), "activation", 0.5, data=data, exclude=["*.weight_hh*"])
    with pytest.raises(InvalidValueError, match=r"'emb'.*shared with 'head'"):
        prunelab.prune(tied(), "activation", 0.5, data=[torch.tensor([[1, 2]])])
    model = mixed()
    prunelab.prune(model, "activation", 0.5, data=data,
                   exclude=["*.weight_hh*", "*_l1", "*_l1_reverse"])
    assert get_mask(model.attn, "in_proj_weight") is not None and get_mask(model.emb) is not None
    assert get_mask(model.lstm, "weight_ih_l0_reverse") is not None
