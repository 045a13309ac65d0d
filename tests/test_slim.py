"""Slimmable networks: conversion, width switching, switchable BatchNorm and export."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import Concat

import prunelab
from prunelab import slim
from prunelab.errors import InvalidValueError
from prunelab.metrics import count_flops
from prunelab.slim.layers import SwitchableBatchNorm

X = torch.randn(6, 3, 32, 32)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "concat":
        return Concat()
    return prunelab.models.create(name)


def shuffle_statistics(net: nn.Module, widths) -> None:
    """A few training forwards at every width, so each width's BatchNorm differs."""
    net.train()
    with torch.no_grad():
        for w in widths:
            with slim.width(net, w):
                for _ in range(2):
                    net(torch.randn(8, 3, 32, 32) * (1 + w))


def test_resnet20_at_half_width_has_a_quarter_of_the_macs() -> None:
    net = slim.convert(build("resnet20"), widths=[0.5, 1.0])
    full = count_flops(net, X[:1]).flops
    with slim.width(net, 0.5):
        half = count_flops(net, X[:1]).flops
    # every conv loses half its inputs and half its outputs, except the stem (3 inputs) and the
    # classifier (10 outputs), which lose one half only
    assert 0.25 <= half / full < 0.26
    assert count_flops(build("resnet20"), X[:1]).flops == full  # full width is the original


def test_width_uses_the_first_channels_with_shared_weights() -> None:
    model = build("resnet20").eval()
    net = slim.convert(model, width_range=(0.25, 1.0)).eval()
    torch.testing.assert_close(net(X), model(X))  # full width is the original network
    assert net.conv1.weight is not model.conv1.weight  # a copy; the model is left alone
    seen = {}
    hook = net.conv1.register_forward_hook(lambda m, i, o: seen.update(y=o))
    with slim.width(net, 0.5):
        net(X)
    hook.remove()
    expected = nn.functional.conv2d(X, net.conv1.weight[:8], None, 1, 1)
    torch.testing.assert_close(seen["y"], expected)
    assert slim.get_width(net) == 1.0  # the context put the width back


def test_coupled_channels_switch_together() -> None:
    net = slim.convert(build("resnet20"), widths=[0.5, 1.0])
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.update({n: o.shape[1]}))
             for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with slim.width(net, 0.5):
        net(X)
    for hook in hooks:
        hook.remove()
    # the residual additions need every block of a stage to produce the same channels
    assert {shapes[f"layer2.{i}.conv2"] for i in range(3)} == {16}
    assert shapes["layer2.0.shortcut.0"] == 16
    assert net(X).shape == (6, 10)  # classifier outputs never change


@pytest.mark.parametrize("kind", ["snet", "usnet"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2-cifar", "vgg11-cifar", "concat"])
def test_export_equals_the_supernet(name: str, kind: str) -> None:
    widths = [0.3, 0.5, 0.75, 1.0]
    options = dict(widths=widths) if kind == "snet" else dict(width_range=(0.3, 1.0))
    net = slim.convert(build(name), **options)
    shuffle_statistics(net, widths)
    net.eval()
    full = count_flops(net, X[:1]).flops
    for w in widths:
        small = slim.export(net, w).eval()
        with slim.width(net, w), torch.no_grad():
            expected = net(X)
            macs = count_flops(net, X[:1]).flops
        torch.testing.assert_close(small(X), expected, rtol=1e-4, atol=1e-5)
        assert count_flops(small, X[:1]).flops == macs  # physically narrow
        assert not any(isinstance(m, slim.layers.SlimLayer) for m in small.modules())
        if w < 1:
            assert macs < full


def test_depthwise_and_concat_use_index_sets() -> None:
    net = slim.convert(build("concat"), widths=[0.5, 1.0])
    with slim.width(net, 0.5):
        assert net.c.groups == 7  # 4 of a's 8 channels and 3 of b's 6
        index = net.d.slim_in
        assert index.tolist() == [0, 1, 2, 3, 8, 9, 10]
        assert net(X).shape == (6, 10)
    assert net.c.groups == 14


def test_switchable_batchnorm_keeps_separate_statistics() -> None:
    net = slim.convert(build("resnet20"), widths=[0.25, 0.5, 1.0])
    bn = net.bn1
    assert isinstance(bn, SwitchableBatchNorm)
    assert [b.num_features for b in bn.bns] == [4, 8, 16]
    before = [b.running_mean.clone() for b in bn.bns]
    net.train()
    with torch.no_grad(), slim.width(net, 0.5):
        net(X + 3)
    after = [b.running_mean for b in bn.bns]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    assert int(bn.bns[1].num_batches_tracked) == 1


def test_shared_batchnorm_is_the_naive_baseline() -> None:
    net = slim.convert(build("resnet20"), widths=[0.5, 1.0], switchable_bn=False)
    assert not any(isinstance(m, SwitchableBatchNorm) for m in net.modules())
    net.train()
    with torch.no_grad(), slim.width(net, 0.5):
        net(X + 3)
    assert net.bn1.running_mean[:8].abs().sum() > 0
    assert net.bn1.running_mean[8:].abs().sum() == 0  # only the active channels move


def test_round_to_keeps_multiples() -> None:
    net = slim.convert(build("mobilenetv2-cifar"), width_range=(0.2, 1.0), round_to=8)
    spec = slim.spec_of(net)
    for w in (0.2, 0.37, 0.6):
        for group, k in zip(spec.groups, spec.counts(w), strict=True):
            assert k % 8 == 0 or k == group.size
            assert k >= min(8, group.size)


def test_exported_model_saves_loads_and_exports_to_onnx(tmp_path) -> None:
    net = slim.convert(build("mobilenetv2-cifar"), widths=[0.5, 1.0])
    shuffle_statistics(net, [0.5, 1.0])
    small = slim.export(net.eval(), 0.5).eval()
    path = prunelab.save_checkpoint(tmp_path / "small.pt", small, model_name="mobilenetv2-cifar")
    loaded, _ = prunelab.load_checkpoint(path)
    torch.testing.assert_close(loaded.eval()(X), small(X))
    report = prunelab.measure(small, X[:1], reference=build("mobilenetv2-cifar"))
    assert report.flops < report.reference_flops / 3
    onnx = pytest.importorskip("onnx")
    prunelab.export_onnx(small, tmp_path / "small.onnx", X[:1])
    onnx.checker.check_model(str(tmp_path / "small.onnx"))


def test_torchvision_models_convert() -> None:
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 64, 64)
    for build_tv in (torchvision.models.resnet18, torchvision.models.mobilenet_v2):
        torch.manual_seed(0)
        net = slim.convert(build_tv(num_classes=5), widths=[0.5, 1.0], example_input=x[:1])
        shuffle_statistics_tv = net.train()
        with torch.no_grad(), slim.width(shuffle_statistics_tv, 0.5):
            net(x)
        net.eval()
        with slim.width(net, 0.5), torch.no_grad():
            expected = net(x)
        torch.testing.assert_close(slim.export(net, 0.5).eval()(x), expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(widths=[]), "non-empty"),
    (dict(widths=[0.5, 1.2]), r"\(0, 1\]"),
    (dict(widths=[0.0, 1.0]), r"\(0, 1\]"),
    (dict(width_range=(0.8, 0.2)), "lo <= hi"),
    (dict(), "either widths"),
    (dict(widths=[0.5], width_range=(0.2, 1.0)), "either widths"),
    (dict(widths=[0.5, 1.0], round_to=0), "round_to"),
    (dict(widths=[0.5, 1.0], exclude=["layer9*"]), "matches no prunable layer"),
])
def test_bad_conversions_get_one_clear_error(options, message) -> None:
    with pytest.raises(InvalidValueError, match=message):
        slim.convert(build("resnet20"), **options)


def test_width_outside_the_list_or_range_is_refused() -> None:
    snet = slim.convert(build("resnet20"), widths=[0.5, 1.0])
    with pytest.raises(InvalidValueError, match="not one of this S-Net's widths"):
        slim.set_width(snet, 0.75)
    with pytest.raises(InvalidValueError, match="need a US-Net"):
        slim.set_width(snet, {"conv1": 4})
    usnet = slim.convert(build("resnet20"), width_range=(0.5, 1.0))
    with pytest.raises(InvalidValueError, match="outside this US-Net's range"):
        slim.set_width(usnet, 0.25)
    with pytest.raises(InvalidValueError, match="Did you mean 'conv1'"):
        slim.set_width(usnet, {"conv": 4})
    with pytest.raises(InvalidValueError, match="from 1 to 16"):
        slim.set_width(usnet, {"conv1": 0})
    with pytest.raises(InvalidValueError, match="not slimmable"):
        slim.set_width(build("resnet20"), 0.5)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)
        self.input_shape = (3, 32, 32)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.norm(self.conv(x)).mean((2, 3)))))


class Grouped(WithLayerNorm):
    def __init__(self):
        super().__init__()
        self.norm = nn.Conv2d(8, 8, 1, groups=2)


def test_layers_that_cannot_switch_are_named() -> None:
    with pytest.raises(slim.SlimmingError, match="'norm' \\(GroupNorm\\)"):
        slim.convert(WithLayerNorm(), widths=[0.5, 1.0])
    with pytest.raises(slim.SlimmingError, match="'norm' is a grouped convolution"):
        slim.convert(Grouped(), widths=[0.5, 1.0])
    net = slim.convert(WithLayerNorm(), widths=[0.5, 1.0], exclude=["conv"])
    assert [g.root for g in slim.spec_of(net).groups] == ["fc"]
    with slim.width(net, 0.5):
        assert net(X).shape == (6, 10)
    with pytest.raises(slim.SlimmingError, match="no channels that can switch width"):
        slim.convert(WithLayerNorm(), widths=[0.5, 1.0], exclude=["conv", "fc"])


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2-cifar", "concat"])
def test_counted_macs_match_torchs_flop_counter(name: str) -> None:
    net = slim.convert(build(name), width_range=(0.2, 1.0))
    spec = slim.spec_of(net)
    configs = [0.2, 0.55, 1.0, {spec.groups[0].root: 3, spec.groups[-1].root: 5}]
    for w in configs:
        with slim.width(net, w):
            assert slim.macs(net, w) == count_flops(net, X[:1]).flops // 2


def test_usnet_training_statistics_move_only_on_active_channels_of_an_index_set() -> None:
    net = slim.convert(build("concat"), width_range=(0.5, 1.0))
    net.train()
    with torch.no_grad(), slim.width(net, 0.5):
        net(X + 5)
    moved = (net.bn.running_mean != 0).nonzero().flatten().tolist()
    assert moved == [0, 1, 2, 3, 8, 9, 10]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 600), round_to=st.sampled_from([1, 2, 4, 8, 16]),
       lo=st.floats(0.01, 1.0), hi=st.floats(0.01, 1.0))
def test_channel_counts_are_rounded_bounded_and_monotone(size, round_to, lo, hi) -> None:
    lo, hi = sorted((lo, hi))
    spec = slim.supernet.SlimSpec([], {}, {}, set(), None, (lo, hi), round_to, (3, 8, 8))
    small, large = spec.channels(lo, size), spec.channels(hi, size)
    for k in (small, large):
        assert 1 <= k <= size
        assert k % round_to == 0 or k == size
    assert small <= large
    assert spec.channels(1.0, size) == size
    if round_to == 1:
        assert abs(spec.channels(hi, size) - hi * size) <= 0.5 or spec.channels(hi, size) == 1


def test_inputs_of_the_wrong_shape_are_one_clear_error() -> None:
    model = build("resnet20")
    wrong = torch.randn(2, 1, 28, 28)
    with pytest.raises(prunelab.PrunelabError, match="takes inputs of shape"):
        slim.convert(model, width_range=(0.25, 1.0), example_input=wrong)
    net = slim.convert(model, width_range=(0.25, 1.0))
    with pytest.raises(prunelab.PrunelabError, match="cannot run on inputs of shape"):
        slim.calibrate_bn(net, 0.5, [(wrong, None)])
