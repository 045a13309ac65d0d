"""Hugging Face causal language models (the optional ``[hf]`` extra) through the same ``prune``:
small randomly initialised GPT-2, OPT and Llama configurations (no weights are downloaded)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import prunelab
from prunelab import hf
from prunelab.errors import InvalidValueError
from prunelab.metrics import evaluate, measure
from prunelab.sparsity import mask_sparsity, prunable_weights

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (pip install prunelab[hf])")

VOCAB, WIDTH, LAYERS, LENGTH = 65, 32, 2, 16
METHODS = ["magnitude", "random", "taylor", "activation"]


def build(kind: str) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``kind``: 2 layers, 32 wide, MLP 4x / 2x."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=2,
                                         vocab_size=VOCAB, n_positions=LENGTH,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                        ffn_dim=4 * WIDTH, num_attention_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=LENGTH, word_embed_proj_dim=WIDTH,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=1)
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                      num_hidden_layers=LAYERS, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=LENGTH)
    return transformers.LlamaForCausalLM(config).eval()


#: MACs of one token's projections per block (attention q, k, v, out + the MLP), by hand.
BLOCK_MACS = {"gpt2": 4 * WIDTH * WIDTH + 2 * WIDTH * 4 * WIDTH,
              "opt": 4 * WIDTH * WIDTH + 2 * WIDTH * 4 * WIDTH,
              "llama": 4 * WIDTH * WIDTH + 3 * WIDTH * 2 * WIDTH}  # gate, up, down


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (8, LENGTH + 1), generator=torch.Generator().manual_seed(1))
    return [(ids[:4, :-1], ids[:4, 1:]), (ids[4:, :-1], ids[4:, 1:])]


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_macs_per_token_and_perplexity(kind: str) -> None:
    model = build(kind)
    per_token = LAYERS * (BLOCK_MACS[kind] + 2 * LENGTH * WIDTH) + WIDTH * VOCAB
    stats = measure(model, batches()[0][0][:1]).summary()
    assert stats["macs_per_token"] == per_token
    result = evaluate(model, batches(), topk=(1,))
    assert result["samples"] == 8 * LENGTH
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["perplexity"] == pytest.approx(VOCAB, rel=0.1)  # random weights: near uniform


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_every_unstructured_method_prunes_the_blocks(kind: str, method: str) -> None:
    model = build(kind)
    include = hf.block_patterns(model)
    pruned = prunelab.prune(copy.deepcopy(model), method, 0.5, data=batches(), include=include)
    blocks = prunable_weights(pruned, include=include)
    assert len(blocks) == LAYERS * (7 if kind == "llama" else 6 if kind == "opt" else 4)
    zeros = sum(int(w.weight.eq(0).sum()) for w in blocks)
    assert zeros == round(0.5 * sum(w.numel() for w in blocks))
    stats = measure(pruned, batches()[0][0][:1]).summary()
    # Not pruned: attention scores, and the output layer (OPT's tied embedding has an all-zero
    # padding row, which the effective count skips).
    attention_and_head = (2 * LAYERS * LENGTH * WIDTH
                          + int(pruned.get_output_embeddings().weight.count_nonzero()))
    assert stats["effective_macs_per_token"] == LAYERS * BLOCK_MACS[kind] / 2 + attention_and_head
    assert math.isfinite(evaluate(pruned, batches(), topk=(1,))["loss"])


def test_gpt2_conv1d_is_prunable_and_activation_reads_its_rows() -> None:
    model = build("gpt2")
    names = [w.name for w in prunable_weights(model, include=hf.block_patterns(model))]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    # Conv1D's weight is (in, out): a zero input feature gives its whole *row* a zero score.
    layer = model.transformer.h[0].mlp.c_proj
    inputs: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    model(batches()[0][0])
    hook.remove()
    rms = inputs[0].reshape(-1, layer.weight.shape[0]).pow(2).mean(0).sqrt()
    method = prunelab.methods.METHODS.get("activation")()
    weight = next(w for w in prunable_weights(model) if w.module is layer)
    score = method.scores(model, [weight], [batches()[0]])[0]
    torch.testing.assert_close(score, layer.weight.detach().abs() * rms.unsqueeze(1))


def test_tied_and_position_embeddings_get_clear_errors_from_activation() -> None:
    model = build("opt")
    with pytest.raises(InvalidValueError, match="shared with 'lm_head'"):
        prunelab.prune(model, "activation", 0.5, data=batches())
    with pytest.raises(InvalidValueError, match=r"embed_positions.*inside its forward"):
        prunelab.prune(model, "activation", 0.5, data=batches(),
                       exclude=["model.decoder.embed_tokens"])


def test_whole_model_magnitude_keeps_the_tie() -> None:
    model = build("gpt2")
    prunelab.prune(model, "magnitude", 0.5)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert mask_sparsity(model) == pytest.approx(0.5, abs=1e-3)
