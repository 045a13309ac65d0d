"""Widening a model for a supernet wider than it (AutoSlim's 1.5x), and rebuilding it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import Concat

import prunelab
from prunelab import slim
from prunelab.errors import InvalidValueError
from prunelab.metrics import count_flops

X = torch.randn(4, 3, 32, 32)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_widened_resnet_has_the_shapes_of_the_zoos_wider_resnet(factor: float) -> None:
    model = prunelab.models.create("resnet20")
    wide = slim.widen(model, factor)
    assert shapes(wide) == shapes(prunelab.models.create("resnet20", width=factor))
    assert shapes(model) == shapes(prunelab.models.create("resnet20"))  # the input is untouched
    assert wide(X).shape == (4, 10)
    # Every layer but the first (3 inputs) and the classifier (10 outputs) has factor^2 the MACs.
    ratio = count_flops(wide, X[:1]).flops / count_flops(model, X[:1]).flops
    assert factor**2 * 0.97 < ratio < factor**2


def test_concatenated_branches_and_depthwise_grow_together() -> None:
    wide = slim.widen(Concat(), 1.5)
    assert (wide.a.out_channels, wide.b.out_channels) == (12, 9)
    assert wide.bn.num_features == wide.c.groups == wide.c.in_channels == 21
    assert (wide.d.in_channels, wide.d.out_channels, wide.fc.in_features) == (21, 18, 18)
    assert wide.fc.out_features == 10 and wide(X).shape == (4, 10)


def test_round_to_and_exclude() -> None:
    wide = slim.widen(prunelab.models.create("mobilenetv2-cifar"), 1.3, round_to=8,
                      exclude=["features.1.*"])
    model = prunelab.models.create("mobilenetv2-cifar")
    for (name, module), (_, before) in zip(wide.named_modules(), model.named_modules(),
                                           strict=True):
        if isinstance(module, nn.Conv2d) and name != "features.0.0":
            if name.startswith("features.1."):
                assert module.out_channels == before.out_channels
            elif module.out_channels != before.out_channels:
                assert module.out_channels % 8 == 0 and module.out_channels > before.out_channels


def test_a_wider_supernet_exports_and_its_export_reloads_from_the_zoo(tmp_path) -> None:
    torch.manual_seed(0)
    wide = slim.widen(prunelab.models.create("resnet20"), 1.5)
    net = slim.convert(wide, width_range=(0.25, 1.0))
    net.eval()
    small = slim.export(net, 0.5).eval()
    with slim.width(net, 0.5), torch.no_grad():
        torch.testing.assert_close(small(X), net(X), rtol=1e-4, atol=1e-5)
    # 0.5 of 1.5x is 0.75x of the base model: more channels than a 0.5x export of the base
    assert small.conv1.out_channels == 12
    path = prunelab.save_checkpoint(tmp_path / "small.pt", small, model_name="resnet20")
    loaded, _ = prunelab.load_checkpoint(path)
    torch.testing.assert_close(loaded.eval()(X), small(X))
    saved = slim.save_supernet(tmp_path / "super.pt", net, model_name="resnet20")
    again, _ = slim.load_supernet(saved)
    with slim.width(again.eval(), 0.5), slim.width(net, 0.5), torch.no_grad():
        torch.testing.assert_close(again(X), net(X))


def test_pruning_a_widened_model_counts_targets_from_the_widened_size() -> None:
    wide = slim.widen(prunelab.models.create("resnet20"), 2.0)
    before = count_flops(wide, X[:1]).flops
    prunelab.prune(wide, "l1-filter", speedup=2.0, round_to=1)
    after = count_flops(wide, X[:1]).flops
    assert before / after == pytest.approx(2.0, rel=0.1)


class FixedView(nn.Module):
    """A forward that hard-codes a channel count: cannot be widened."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).view(-1, 8))


@pytest.mark.parametrize("factor", [0.5, 0, float("nan"), "2", True])
def test_bad_factors_are_refused(factor) -> None:
    with pytest.raises(InvalidValueError, match="factor >= 1"):
        slim.widen(prunelab.models.create("resnet20"), factor)


def test_a_factor_that_cannot_fit_in_memory_is_refused_before_allocating() -> None:
    with pytest.raises(InvalidValueError, match=r"more than this machine's \d+ GiB of memory"):
        slim.widen(prunelab.models.create("resnet20"), 1e9)
    with pytest.raises(InvalidValueError, match="up to inf GiB"):  # factor² beyond a float
        slim.widen(prunelab.models.create("resnet20"), 1e200)


def test_a_forward_that_fixes_a_channel_count_is_named() -> None:
    with pytest.raises(slim.SlimmingError, match="fixes a channel count"):
        slim.widen(FixedView(), 1.5, example_input=X[:1])
    with pytest.raises(InvalidValueError, match="matches no prunable layer"):
        slim.widen(prunelab.models.create("resnet20"), 1.5, exclude=["nosuch*"])
    net = slim.convert(prunelab.models.create("resnet20"), widths=[0.5, 1.0])
    with pytest.raises(InvalidValueError, match="before converting"):
        slim.widen(net, 1.5)
