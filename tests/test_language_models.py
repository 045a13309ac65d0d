"""Transformers and language models: the zoo's gpt-char and vit-cifar, Tiny Shakespeare,
loss/perplexity, MACs per token, head pruning, and LM runs through run, sweep and report."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import prunelab
from prunelab import data, models
from prunelab.checkpoint import load_checkpoint, save_checkpoint
from prunelab.cli import app, main
from prunelab.errors import DatasetNotFoundError, InvalidValueError
from prunelab.metrics import evaluate, measure
from prunelab.sparsity import mask_sparsity, prunable_weights
from prunelab.structured.graph import structure_of

runner = CliRunner()
TINY_GPT = {"layers": 2, "width": 32, "heads": 4}
UNSTRUCTURED = ["magnitude", "random", "taylor", "activation"]


def gpt(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return models.create("gpt-char", num_classes=65, input_shape=(16,), **(TINY_GPT | kwargs))


def token_batches(n: int = 2, length: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 65, (n * 4, length + 1), generator=g)
    return [(ids[i : i + 4, :-1], ids[i : i + 4, 1:]) for i in range(0, n * 4, 4)]


# ------------------------------------------------------------------------------------ models
def test_gpt_char_parameter_count_by_hand() -> None:
    v, t, d, layers = 65, 64, 128, 4
    per_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    expected = v * d + t * d + layers * per_block + 2 * d + d * v
    model = models.create("gpt-char", num_classes=v)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.input_shape == (64,) and model(torch.zeros(2, 64).long()).shape == (2, 64, v)


def test_gpt_char_is_causal() -> None:
    model = gpt().eval()
    x = torch.randint(0, 65, (1, 16))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 65
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[0, :10], b[0, :10])  # earlier positions never see later tokens
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_tied_head_shares_the_embedding() -> None:
    model = gpt(tie_weights=True)
    assert model.head.weight is model.tokens.weight
    names = {w.name: w for w in prunable_weights(model)}
    assert "head" not in names and names["tokens"].shared


def test_prunable_registry_sees_every_projection() -> None:
    names = [w.name for w in prunable_weights(gpt())]
    per_block = ["attn.query", "attn.key", "attn.value", "attn.out", "fc1", "fc2"]
    assert names == ["tokens", "positions",
                     *(f"blocks.{i}.{n}" for i in range(2) for n in per_block), "head"]
    vit = [w.name for w in prunable_weights(models.create("vit-cifar", layers=1))]
    assert vit == ["patches", *(f"blocks.0.{n}" for n in per_block), "head"]


@pytest.mark.parametrize(("kwargs", "mentions"), [
    ({"input_shape": (3, 32, 32)}, "token sequences"),
    ({"heads": 3}, "not divisible"),
    ({"layers": 0}, "layers"),
    ({"dropout": 1.5}, "dropout"),
])
def test_gpt_char_bad_options(kwargs: dict, mentions: str) -> None:
    with pytest.raises(InvalidValueError, match=mentions):
        models.create("gpt-char", **kwargs)


def test_vit_cifar_forward_and_bad_patch() -> None:
    model = models.create("vit-cifar", num_classes=7, layers=2).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(InvalidValueError, match="multiple of patch"):
        models.create("vit-cifar", patch=5)


def test_sequence_longer_than_context_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="longer than the model's context"):
        gpt()(torch.zeros(1, 17).long())


# --------------------------------------------------------------- unstructured pruning
@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_every_unstructured_method_prunes_the_gpt(method: str) -> None:
    batches = token_batches()
    model = prunelab.prune(gpt(), method, 0.5, data=batches)
    assert mask_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    weights = {w.name: w for w in prunable_weights(model)}
    assert weights["blocks.0.attn.query"].module.weight.eq(0).any()  # attention is pruned too
    assert torch.isfinite(model(batches[0][0])).all()


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_every_unstructured_method_prunes_the_vit(method: str) -> None:
    torch.manual_seed(0)
    model = models.create("vit-cifar", layers=1, width=32, heads=2)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    prunelab.prune(model, method, 0.6, data=batches)
    assert mask_sparsity(model) == pytest.approx(0.6, abs=1e-3)


def test_taylor_on_a_language_model_is_a_mean_over_batches() -> None:
    # Same batches twice: the mean gradient, hence the scores, are unchanged.
    model, batches = gpt(), token_batches(1)
    once = prunelab.methods.METHODS.get("taylor")().scores(model, prunable_weights(model), batches)
    twice = prunelab.methods.METHODS.get("taylor")().scores(model, prunable_weights(model),
                                                            batches * 2)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-9) for a, b in zip(once, twice,
                                                                          strict=True))


# --------------------------------------------------------------- structured: heads and MLP
def _zeroed_equivalent(model: nn.Module, pruned: nn.Module, head_dim: int) -> nn.Module:
    """The original model with the removed heads' and neurons' contributions zeroed: the
    columns of ``attn.out`` and ``fc2`` reading them (removal must equal this exactly)."""
    reference = copy.deepcopy(model)
    for block, small in zip(reference.blocks, pruned.blocks, strict=True):
        kept_heads = {h for h in range(block.attn.heads)
                      if any(torch.equal(block.attn.query.weight[h * head_dim:(h + 1) * head_dim],
                                         small.attn.query.weight[k * head_dim:(k + 1) * head_dim])
                             for k in range(small.attn.heads))}
        with torch.no_grad():
            for h in set(range(block.attn.heads)) - kept_heads:
                block.attn.out.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            kept = {tuple(r.tolist()) for r in small.fc1.weight}
            for j, row in enumerate(block.fc1.weight):
                if tuple(row.tolist()) not in kept:
                    block.fc2.weight[:, j] = 0
    return reference


def test_head_pruning_removes_whole_heads_and_equals_zeroing_them() -> None:
    model, x = gpt(), token_batches(1)[0][0]
    pruned = prunelab.prune(copy.deepcopy(model), "l2-channel", 0.5, scope="layer",
                            include=["*.attn.*", "*.fc1"], example_input=x)
    for block in pruned.blocks:
        assert block.attn.heads == 2 and block.attn.head_dim == 8  # heads go, head_dim stays
        assert block.attn.query.out_features == block.attn.key.out_features == 16
        assert block.attn.out.in_features == 16 and block.fc1.out_features == 64
    assert type(pruned.blocks[0].attn).__module__ == "prunelab.models.transformer"
    reference = _zeroed_equivalent(model, pruned, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_global_head_pruning_keeps_a_head_per_layer_and_reaches_the_ratio() -> None:
    model, x = gpt(), token_batches(1)[0][0]
    pruned = prunelab.prune(model, "l2-channel", 0.6, include=["*.attn.*", "*.fc1"],
                            example_input=x)
    removed = sum(32 - b.attn.query.out_features + 128 - b.fc1.out_features
                  for b in pruned.blocks)
    assert abs(removed - 0.6 * 2 * (32 + 128)) <= 4  # a head is 8 channels: within half of one
    assert all(b.attn.heads >= 1 for b in pruned.blocks)


def test_vit_loses_heads_and_mlp_neurons_and_still_runs() -> None:
    torch.manual_seed(0)
    model = models.create("vit-cifar", layers=2, width=48, heads=3)
    x = torch.randn(2, 3, 32, 32)
    pruned = prunelab.prune(model, "l2-channel", 0.34, scope="layer",
                            include=["*.attn.*", "*.fc1"], example_input=x, round_to=1)
    assert [b.attn.heads for b in pruned.blocks] == [2, 2]  # round(0.34 * 3) = 1 head each
    assert all(b.attn.head_dim == 16 and b.fc1.out_features == 63 for b in pruned.blocks)
    assert pruned(x).shape == (2, 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1, 4, 8])), min_size=1,
                max_size=5),
       st.floats(0.0, 0.95), st.integers(0, 2**31 - 1))
def test_block_plans_remove_whole_heads_and_meet_the_ratio(shapes, ratio, seed) -> None:
    from prunelab.structured.graph import ChannelGroup
    from prunelab.structured.method import _plan

    g = torch.Generator().manual_seed(seed)
    groups = [ChannelGroup(f"g{i}", nn.Identity(), units * block)
              for i, (units, block) in enumerate(shapes)]
    blocks = [block for _, block in shapes]
    scores = [torch.rand(group.size, generator=g) for group in groups]
    plan = _plan(groups, scores, ratio, "global", {}, False, round, {}, blocks)
    for group, block in zip(groups, blocks, strict=True):
        removed = set(plan.get(group.root, []))
        assert len(removed) <= group.size - block  # at least one head (or channel) stays
        heads = {c // block for c in removed}
        assert removed == {h * block + j for h in heads for j in range(block)}  # whole heads
    removable = sum(group.size - block for group, block in zip(groups, blocks, strict=True))
    target = min(round(ratio * sum(group.size for group in groups)), removable)
    total = sum(len(v) for v in plan.values())
    assert abs(total - target) <= max(blocks) / 2 or total == removable


def test_head_pruned_checkpoint_reloads_from_the_zoo_name(tmp_path: Path) -> None:
    x = token_batches(1)[0][0]
    pruned = prunelab.prune(gpt(), "l2-channel", 0.5, scope="layer", include=["*.attn.*"],
                            example_input=x)
    path = save_checkpoint(tmp_path / "gpt.pt", pruned, model_name="gpt-char",
                           model_kwargs={"num_classes": 65, "input_shape": [16], **TINY_GPT})
    loaded, _ = load_checkpoint(path)
    assert structure_of(loaded) and [b.attn.heads for b in loaded.blocks] == [2, 2]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned.eval()(x))


# ------------------------------------------------------------------------------------ data
def test_tiny_shakespeare_windows_and_split(shared_data: Path) -> None:
    bundle = data.load("tinyshakespeare", shared_data, block_size=64)
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    assert bundle.num_classes == 65 and bundle.input_shape == (64,)
    assert "".join(bundle.class_names) == "".join(sorted(set(text)))
    cut = int(0.9 * len(text))
    # The test split is the last 10% of the text, in order, as non-overlapping windows.
    test_x, test_y = bundle.test
    assert len(test_x) == (len(text) - cut - 1) // 64
    decode = "".join
    assert decode(bundle.class_names[i] for i in test_x[0]) == text[cut:cut + 64]
    assert decode(bundle.class_names[i] for i in test_y[0]) == text[cut + 1:cut + 65]
    assert bundle.sizes["train"] + bundle.sizes["val"] == (cut - 1) // 64
    x, y = next(iter(bundle.loader("train", 8, shuffle=True, seed=3)))
    assert x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    again, _ = next(iter(bundle.loader("train", 8, shuffle=True, seed=3)))
    other, _ = next(iter(bundle.loader("train", 8, shuffle=True, seed=4)))
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_tiny_shakespeare_options_and_missing_root(shared_data: Path, tmp_path: Path) -> None:
    assert data.load("tinyshakespeare", shared_data, block_size=256).input_shape == (256,)
    with pytest.raises(InvalidValueError, match="block_size"):
        data.load("tinyshakespeare", shared_data, block_size=0)
    with pytest.raises(DatasetNotFoundError, match="tinyshakespeare"):
        data.load("tinyshakespeare", tmp_path, download=False)


# ------------------------------------------------------------------------------- metrics
class Uniform(nn.Module):
    """Equal logits over 65 tokens at every position: loss ln 65, perplexity 65."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 65) * self.scale


def test_uniform_model_has_perplexity_equal_to_the_vocabulary() -> None:
    result = evaluate(Uniform(), token_batches(3), topk=(1,))
    assert result["loss"] == pytest.approx(math.log(65))
    assert result["perplexity"] == pytest.approx(65.0)
    assert result["samples"] == 3 * 4 * 16  # every token is a prediction


def test_loss_is_the_mean_over_every_token() -> None:
    model, batches = gpt().eval(), token_batches(2)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x).reshape(-1, 65), y.reshape(-1),
                                              reduction="none") for x, y in batches]
    result = evaluate(model, batches, topk=(1,))
    assert result["loss"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_perplexity_of_a_classifier_and_mismatched_targets_are_refused() -> None:
    classifier = models.create("lenet-300-100")
    images = [(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))]
    with pytest.raises(InvalidValueError, match="perplexity is a language-model metric"):
        evaluate(classifier, images, perplexity=True)
    with pytest.raises(InvalidValueError, match="do not match labels"):
        evaluate(gpt(), [(torch.zeros(2, 16).long(), torch.tensor([1, 2]))])


def test_language_model_given_images_and_classifier_given_tokens() -> None:
    with pytest.raises(InvalidValueError, match="is a language model"):
        evaluate(gpt(), [(torch.randn(2, 16), torch.zeros(2, 16).long())])
    with pytest.raises(InvalidValueError, match="not a language model"):
        evaluate(models.create("lenet-300-100", input_shape=(16,)),
                 [(torch.zeros(2, 16).long(), torch.tensor([1, 2]))])


def test_macs_per_token_by_hand() -> None:
    v, t, d, layers = 65, 64, 128, 4
    per_token = layers * (4 * d * d + 2 * d * 4 * d + 2 * t * d) + d * v  # attention: QK, AV
    stats = measure(models.create("gpt-char", num_classes=v), torch.zeros(1, t).long())
    assert stats.summary()["macs_per_token"] == per_token
    assert "macs_per_token" not in measure(models.create("lenet-300-100"),
                                           torch.zeros(1, 1, 28, 28)).summary()


def test_inspect_prints_macs_per_token() -> None:
    result = runner.invoke(app, ["inspect", "gpt-char", "--num-classes", "65"])
    assert result.exit_code == 0 and "MACs per token: 860,288" in result.output


def test_training_lowers_the_loss_and_keeps_the_best_by_loss() -> None:
    from prunelab.training import TrainRecipe, train

    model, batches = gpt(), token_batches(4)
    before = evaluate(model, batches, topk=(1,))["loss"]
    recipe = TrainRecipe(epochs=3, batch_size=4, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    result = train(model, batches, recipe, val_data=batches, keep_best=True, quiet=True)
    losses = [h["val_loss"] for h in result.history]
    assert all("val_perplexity" in h for h in result.history)
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert evaluate(model, batches, topk=(1,))["loss"] == pytest.approx(min(losses), rel=1e-5)
    assert min(losses) < before


# --------------------------------------------------------------------- run, sweep, report
def tiny_lm_config(tmp_path: Path) -> dict:
    return {
        "model": "gpt-char", "model_kwargs": {"layers": 1, "width": 16, "heads": 2},
        "dataset": "tinyshakespeare", "dataset_options": {"block_size": 16}, "data_limit": 64,
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3},
        "finetune": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3},
        "latency": {"enabled": False},
    }


def test_run_a_language_model_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(tiny_lm_config(tmp_path) | {"sparsities": [0.5]}))
    result = runner.invoke(app, ["run", "-q", "--config", str(config), "--out",
                                 str(tmp_path / "runs"), "--data-dir", str(shared_data)])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "MACs/token" in result.output


@pytest.mark.parametrize(("model", "dataset", "says"), [
    ("gpt-char", "digits", "takes token sequences"),
    ("lenet-300-100", "tinyshakespeare", "not a language model"),
])
def test_run_with_the_wrong_kind_of_data_exits_2(shared_data: Path, tmp_path: Path, capsys,
                                                 model: str, dataset: str, says: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-q", "--model", model, "--dataset", dataset, "--epochs", "1",
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert lines[-1].startswith("error: ") and says in lines[-1]


def test_sweep_store_and_report_of_a_language_model(shared_data: Path, tmp_path: Path) -> None:
    from prunelab.bench import ResultStore, SweepSpec, run_sweep
    from prunelab.bench.report import markdown_summary, write_report
    from prunelab.config import validate

    spec = validate(SweepSpec, tiny_lm_config(tmp_path) | {"name": "lm", "grid": {
        "methods": ["magnitude"], "targets": {"sparsity": [0.5]}, "seeds": [0],
        "controls": False}})
    assert run_sweep(spec, tmp_path, quiet=True).ok == 1  # the dense row comes on top
    with ResultStore(tmp_path / "results.sqlite") as store:
        rows = store.rows()
    for row in rows:
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
        assert row["macs_per_token"] > 0
    text = markdown_summary(tmp_path)
    assert "nats/token" in text and "perplexity" in text
    page = write_report(tmp_path).read_text()
    assert "loss mean (nats/token)" in page and (tmp_path / "report" /
                                                 "loss_vs_compression.png").is_file()
