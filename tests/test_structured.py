"""Structured pruning: real removal on many architectures, targets, export, the methods."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from toy_models import Concat

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.methods.thinet import greedy_removal_order
from prunelab.metrics import measure
from prunelab.structured import structure_of
from prunelab.structured.graph import ChannelGroup
from prunelab.structured.rounding import _rounded, kernel_multiple, layer_multiple

X = torch.randn(8, 3, 32, 32)
Y = torch.randint(0, 10, (8,))
DATA = [(X, Y)]
CHANNEL_METHODS = ["l1-filter", "l2-channel", "random-channel", "taylor-channel", "apoz",
                   "slimming", "sss", "thinet", "lasso-channel"]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "concat":
        return Concat().eval()
    if name == "lenet-5":
        return prunelab.models.create(name, input_shape=(3, 32, 32)).eval()
    return prunelab.models.create(name).eval()


@pytest.mark.parametrize("name", ["resnet20", "vgg11-cifar", "mobilenetv2-cifar", "lenet-5",
                                  "concat"])
@pytest.mark.parametrize("method", ["l2-channel", "random-channel"])
def test_removal_keeps_every_architecture_consistent(name: str, method: str) -> None:
    model = build(name)
    before = measure(model, X[:1])
    prunelab.prune(model, method, sparsity=0.4, data=DATA)
    after = measure(model, X[:1])
    assert model(X).shape == (8, 10)  # runs, and the classes are all there
    assert after.params < before.params and after.flops < before.flops
    assert after.nonzero_params == after.params or after.params < before.params
    assert not any("parametrizations" in k for k in model.state_dict())  # plain module


@pytest.mark.parametrize("method", CHANNEL_METHODS)
def test_every_channel_method_shrinks_resnet20(method: str) -> None:
    model = build("resnet20")
    flops = measure(model, X[:1]).flops
    prunelab.prune(model, method, sparsity=0.3, data=DATA)
    assert measure(model, X[:1]).flops < flops and model(X).shape == (8, 10)


@pytest.mark.parametrize(("target", "value"), [("speedup", 2.0), ("compression", 1.5)])
def test_targets_are_reached(target: str, value: float) -> None:
    model = build("resnet20")
    before = measure(model, X[:1])
    prunelab.prune(model, "l2-channel", **{target: value}, round_to=1)  # exact counts
    after = measure(model, X[:1])
    reached = before.flops / after.flops if target == "speedup" else before.params / after.params
    assert value <= reached < value * 1.05


def test_unreachable_target_says_what_is_reachable() -> None:
    with pytest.raises(InvalidValueError, match=r"out of reach.*gives \d"):
        prunelab.prune(build("resnet20"), "l1-filter", speedup=100.0)


@pytest.mark.parametrize(("name", "preset", "flops", "params"), [
    ("resnet56", "resnet56-a", 10.4, 9.4),   # Li et al. 2017, Table 1
    ("resnet56", "resnet56-b", 27.6, 13.7),
    ("vgg16-cifar", "vgg16-a", 34.2, 64.0),
])
def test_l1_filter_presets_reproduce_li_et_al(name, preset, flops, params) -> None:
    model = build(name)
    before = measure(model, X[:1])
    prunelab.prune(model, "l1-filter", preset=preset)
    after = measure(model, X[:1])
    # Our ResNets have projection shortcuts and our VGG one classifier layer: 0.5 points slack.
    assert 100 * (1 - after.flops / before.flops) == pytest.approx(flops, abs=0.5)
    assert 100 * (1 - after.params / before.params) == pytest.approx(params, abs=0.5)


@pytest.mark.parametrize("options", [{"preset": "resnet56-a"}, {"exclude": ["layer9.*"]},
                                     {"layer_sparsity": {"layer1.0.conv9": 0.5}}])
def test_patterns_that_name_no_layer_are_refused(options) -> None:
    with pytest.raises(InvalidValueError, match="matches no prunable layer of this model"):
        prunelab.prune(build("resnet20"), "l1-filter", sparsity=0.3, **options)


def test_l1_filter_removes_the_smallest_filters() -> None:
    conv, fc = nn.Conv2d(2, 4, 1, bias=False), nn.Linear(4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 0.1, 2.0, 0.2]).view(4, 1, 1, 1).expand(4, 2, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    kept_fc = fc.weight[:, [0, 2]].clone()
    prunelab.prune(model, "l1-filter", 0.5, example_input=torch.randn(1, 2, 4, 4))
    assert conv.weight[:, 0, 0, 0].tolist() == [3.0, 2.0]
    assert torch.equal(fc.weight, kept_fc)  # the reader lost the matching columns


def test_save_load_script_and_onnx_round_trip(tmp_path) -> None:
    import onnxruntime

    model = build("mobilenetv2-cifar")
    prunelab.prune(model, "l2-channel", speedup=1.5)
    path = prunelab.save_checkpoint(tmp_path / "m.pt", model, model_name="mobilenetv2-cifar")
    loaded, _ = prunelab.load_checkpoint(path)
    loaded.eval()
    expected = model(X)
    assert structure_of(loaded) and torch.allclose(loaded(X), expected, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(loaded)
    assert torch.allclose(scripted(X), expected, atol=1e-5)
    onnx_path = prunelab.export_onnx(loaded, tmp_path / "m.onnx", X[:1])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": X.numpy()})[0]
    assert abs(got - expected.detach().numpy()).max() < 1e-4


def test_custom_op_error_names_the_layer() -> None:
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(4, 8, 3), nn.Linear(8, 5)

        def forward(self, x):
            y = self.a(x)
            y = y.reshape(y.shape[0], 4, 4, *y.shape[2:]).sum(1)  # mixes channel groups
            return self.fc(self.b(y).mean((2, 3)))

    model = Mixing()
    with pytest.raises(InvalidValueError, match=r"layer 'a'.*exclude=\['a'\]"):
        prunelab.prune(model, "l1-filter", 0.5, example_input=torch.randn(1, 3, 12, 12))
    assert model.a.out_channels == 16  # nothing was removed
    prunelab.prune(model, "l1-filter", 0.5, example_input=torch.randn(1, 3, 12, 12),
                   exclude=["a"])
    assert model.b.out_channels == 4


def test_masked_models_must_be_made_permanent_first() -> None:
    model = build("resnet20")
    prunelab.prune(model, "magnitude", 0.5)
    with pytest.raises(InvalidValueError, match="make_permanent"):
        prunelab.prune(model, "l1-filter", 0.3)


def test_thinet_greedy_removes_what_cancels_out() -> None:
    z = torch.tensor([[1.0, -1.0, 5.0, 0.1], [2.0, -2.0, 4.0, 0.0]])
    order = greedy_removal_order(z)
    assert order[0] == 3  # the smallest contribution goes first
    assert set(order[1:3]) == {0, 1}  # then the pair that cancels out
    assert order[-1] == 2


@pytest.mark.parametrize("method", ["thinet", "lasso-channel"])
def test_reconstruction_beats_plain_removal(method: str) -> None:
    torch.manual_seed(1)
    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 4)).eval()

    data = [torch.randn(16, 3, 12, 12) for _ in range(4)]
    reference = net()
    target = reference[:3](data[0])

    def error(model):
        return float((model[:3](data[0]) - target).pow(2).mean())

    reconstructed = prunelab.prune(net(), method, 0.5, data=data, samples=2000, include=["0"])
    # The same channels removed without reconstruction:
    plain = net()
    kept = [i for i in range(16) if i in _kept_filters(reference[0], reconstructed[0])]
    plain[0].weight.data = plain[0].weight.data[kept]
    plain[0].bias.data = plain[0].bias.data[kept]
    plain[2].weight.data = plain[2].weight.data[:, kept]
    # ThiNet only rescales the kept channels; He et al. refit the whole next layer.
    assert error(reconstructed) < (0.995 if method == "thinet" else 0.7) * error(plain)


def _kept_filters(original: nn.Conv2d, pruned: nn.Conv2d) -> list[int]:
    return [i for i in range(original.out_channels)
            if any(torch.equal(original.weight[i], w) for w in pruned.weight)]


def test_slimming_penalty_and_sss_proximal_steps_make_scales_sparse() -> None:
    from prunelab.methods.slimming import BNScaleAPG, BNScaleL1
    from prunelab.training import TrainRecipe, train

    def scales_after(callbacks):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        recipe = TrainRecipe(epochs=30, lr=0.05, weight_decay=0, schedule="constant")
        train(model, [(X, Y)], recipe, callbacks=callbacks, quiet=True)
        return model[1].weight.detach()

    plain = scales_after([])
    slim = scales_after([BNScaleL1(0.05)])
    sss = scales_after([BNScaleAPG(0.5)])
    assert slim.abs().sum() < 0.8 * plain.abs().sum()
    assert int((sss == 0).sum()) >= 4 and int((plain == 0).sum()) == 0  # exact zeros


def test_structured_scratch_and_targets_in_a_sweep(tmp_path) -> None:
    from prunelab.bench import ResultStore, SweepSpec, run_sweep
    from prunelab.config import validate

    spec = validate(SweepSpec, {
        "model": "resnet20", "dataset": "digits",
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "latency": {"enabled": False},
        "grid": {"methods": ["l1-filter", {"method": "slimming", "options": {"l1": 1e-4}}],
                 "targets": {"speedup": [2.0]}, "seeds": [0],
                 "recoveries": ["finetune", "scratch-e", "scratch-b"], "controls": False},
    })
    summary = run_sweep(spec, tmp_path, quiet=True)
    assert (summary.ok, summary.failed) == (6, 0)
    with ResultStore(tmp_path / "results.sqlite") as store:
        rows = store.rows()
    dense = {r["label"] for r in rows if r["method"] == "dense"}
    assert dense == {"dense", "dense (slimming training)"}
    for row in rows:
        if row["method"] != "dense":
            # The machine's channel multiples (the default) step past the target a little.
            assert 2.0 <= row["theoretical_speedup"] < 2.25
            assert re.fullmatch(r"auto\((4|8|16)\)", row["round_to"])
            # channels removed, nothing masked: the fraction of parameters gone
            assert row["achieved_sparsity"] == pytest.approx(1 - 1 / row["compression"])
            assert 0.2 < row["achieved_sparsity"] < 0.8


def test_round_to_keeps_multiples_of_eight() -> None:
    model = build("vgg11-cifar")
    prunelab.prune(model, "l2-channel", sparsity=0.3, scope="layer", round_to=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert sum(c.out_channels for c in convs) < sum(
        c.out_channels for c in build("vgg11-cifar").modules() if isinstance(c, nn.Conv2d))


def test_rounding_hands_back_what_rounding_down_frees() -> None:
    """Three 64-channel layers planned to keep 52 each (156 in all), multiples of 16: rounding
    each alone keeps 48+48+48 = 144; balanced rounding gives one of them back its 16 (160), and
    a 16-channel layer keeps all its channels (it has no smaller multiple of 16)."""
    groups = [ChannelGroup(f"c{i}", nn.Identity(), 64) for i in range(3)]
    groups.append(ChannelGroup("narrow", nn.Identity(), 16))
    scores = [torch.arange(g.size, dtype=torch.float) for g in groups]
    plan = {g.root: list(range(12)) for g in groups[:3]} | {"narrow": [0, 1, 2, 3]}
    kept = {root: 64 - len(removed) for root, removed in _rounded(plan, groups, scores, 16).items()}
    assert sorted(kept.values()) == [48, 48, 64]
    assert "narrow" not in kept
    assert sum(kept.values()) == 160


def test_round_to_sixteen_keeps_the_narrow_stage_and_reaches_the_target_closely() -> None:
    model = build("resnet20")
    dense = measure(build("resnet20"), torch.zeros(1, 3, 32, 32)).flops
    prunelab.prune(model, "l2-channel", speedup=1.5, scope="layer", round_to=16)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(c.out_channels % 16 == 0 for c in convs.values())
    assert all(c.out_channels == 16 for n, c in convs.items() if n.startswith("layer1"))
    assert 1.5 <= dense / measure(model, torch.zeros(1, 3, 32, 32)).flops < 1.65
    with pytest.raises(InvalidValueError, match=r"round_to=16 keeps .* round_to=1 reaches further"):
        prunelab.prune(build("resnet20"), "l2-channel", speedup=3.0, round_to=16)
    for bad in (0, -16, True, 2.5):
        with pytest.raises(InvalidValueError, match=r"'round_to' must be int >= 1 \| None, got"):
            prunelab.prune(build("resnet20"), "l2-channel", sparsity=0.3, round_to=bad)


@pytest.mark.parametrize(("capability", "multiple"), [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 4)])
def test_the_default_rounding_is_the_machines_capped_at_a_quarter_of_a_layer(
        monkeypatch, capability: str, multiple: int) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert kernel_multiple("cpu") == multiple and kernel_multiple("cuda") == 8
    # Each layer keeps a multiple that fits it at least four times.
    assert [layer_multiple(n, 16) for n in (256, 64, 63, 32, 16, 8, 3)] == [16, 16, 8, 8, 4, 2, 1]
    model = build("resnet20")
    original = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prunelab.prune(model, "l2-channel", sparsity=0.4, scope="layer")
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.out_channels % layer_multiple(original[name], multiple) == 0, name
    assert structure_of(model)[-1]["round_to"] == f"auto({multiple})"
    assert sum(original.values()) > sum(_convs_out(model))


def _convs_out(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
