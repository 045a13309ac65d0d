"""Slimmable training (every width per step, sandwich rule, inplace distillation) and BN
calibration, checked against gradients and statistics computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab import slim
from prunelab.errors import InvalidValueError
from prunelab.structured import structure_of
from prunelab.training import TrainRecipe

torch.manual_seed(0)
X = torch.randn(16, 3, 8, 8)
Y = torch.randint(0, 4, (16,))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def plain_sgd(lr: float = 0.1) -> TrainRecipe:
    return TrainRecipe(epochs=1, batch_size=16, lr=lr, momentum=0.0, weight_decay=0.0,
                       schedule="constant", channels_last=False)


def one_step_update(net: nn.Module, **options) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    slim.train(net, [(X, Y)], plain_sgd(), quiet=True, **options)
    return {n: before[n] - p.detach() for n, p in net.named_parameters()}


def test_snet_step_follows_the_summed_gradient_of_every_width() -> None:
    torch.manual_seed(1)
    net = slim.convert(Small(), widths=[0.25, 0.5, 1.0])
    reference = copy.deepcopy(net).train()
    for w in (1.0, 0.5, 0.25):
        with slim.width(reference, w):
            F.cross_entropy(reference(X), Y).backward()
    update = one_step_update(net)
    for name, p in reference.named_parameters():
        expected = 0.1 * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(update[name], expected, rtol=1e-4, atol=1e-6)
    # the private BatchNorm of each width learned only from its own width
    assert update["bn.bns.0.weight"].abs().sum() > 0 and update["bn.bns.2.weight"].abs().sum() > 0


def test_usnet_inplace_distillation_uses_the_largest_widths_predictions() -> None:
    torch.manual_seed(2)
    net = slim.convert(Small(), width_range=(0.25, 1.0))
    reference = copy.deepcopy(net).train()
    callback = slim.SlimmableTraining(net, sandwich=3, seed=5)
    widths = callback.step_widths()  # the widths the training run will draw (same seed)
    assert widths[:2] == [1.0, 0.25] and 0.25 <= widths[2] <= 1.0
    teacher = reference(X)
    loss = F.cross_entropy(teacher, Y)
    soft = F.softmax(teacher.detach(), 1)
    for w in widths[1:]:
        with slim.width(reference, w):
            loss = loss - (soft * F.log_softmax(reference(X), 1)).sum(1).mean()
    loss.backward()
    update = one_step_update(net, sandwich=3, seed=5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(update[name], 0.1 * p.grad, rtol=1e-4, atol=1e-6)


def test_sandwich_rule_trains_the_largest_and_smallest_every_step() -> None:
    net = slim.convert(Small(), width_range=(0.25, 0.75))
    seen: list[float] = []
    net.register_forward_pre_hook(lambda m, i: seen.append(slim.get_width(m)) if m.training
                                  else None)
    recipe = plain_sgd().model_copy(update={"epochs": 2})
    slim.train(net, [(X[:8], Y[:8]), (X[8:], Y[8:])], recipe, sandwich=4, quiet=True)
    steps = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert len(steps) == 4
    for step in steps:
        assert step[0] == 0.75 and step[1] == 0.25  # max then min, every step
        assert all(0.25 <= w <= 0.75 for w in step[2:])
    assert len({w for step in steps for w in step[2:]}) == 8  # random ones differ
    assert slim.get_width(net) == 0.75


def test_every_width_trains_in_the_recipes_precision() -> None:
    """With a bf16 recipe the other widths' forward passes (run by the callback) are under
    autocast too, not only the loop's own pass at the largest width."""
    net = slim.convert(Small(), widths=[0.25, 0.5, 1.0])
    dtypes: list[torch.dtype] = []
    net.fc.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype) if m.training
                                 else None)
    recipe = plain_sgd().model_copy(update={"precision": "bf16"})
    slim.train(net, [(X, Y)], recipe, quiet=True)
    assert dtypes == [torch.bfloat16] * 3


def test_training_history_reports_the_smallest_width() -> None:
    net = slim.convert(Small(), widths=[0.5, 1.0])
    result = slim.train(net, [(X, Y)], plain_sgd(), val_data=[(X, Y)], quiet=True)
    assert {"train_loss_min_width", "val_top1_min_width", "val_top1"} <= set(result.history[0])


def test_calibration_is_the_average_of_batch_statistics() -> None:
    torch.manual_seed(3)
    net = slim.convert(Small(), width_range=(0.25, 1.0)).eval()
    batches = [torch.randn(5, 3, 8, 8) * (i + 1) + i for i in range(3)]
    shared = net.bn.running_mean.clone()
    slim.calibrate_bn(net, 0.5, batches)
    assert torch.equal(net.bn.running_mean, shared)  # training statistics untouched
    with torch.no_grad():
        outs = [F.conv2d(x, net.conv.weight[:4], net.conv.bias[:4], padding=1) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    (stats,) = net.bn.slim_calibrated.values()
    torch.testing.assert_close(stats[0], mean)
    torch.testing.assert_close(stats[1], var)
    # eval at that width uses them; export bakes them in
    with slim.width(net, 0.5), torch.no_grad():
        expected = net(X)
        y = F.conv2d(X, net.conv.weight[:4], net.conv.bias[:4], padding=1)
        bn_out = F.batch_norm(y, mean, var, net.bn.weight[:4], net.bn.bias[:4], False, 0, 1e-5)
        seen = {}
        hook = net.bn.register_forward_hook(lambda m, i, o: seen.update(o=o))
        net(X)
        hook.remove()
    torch.testing.assert_close(seen["o"], bn_out)
    torch.testing.assert_close(slim.export(net, 0.5).eval()(X), expected)
    # another width was not calibrated: it still runs on the shared statistics
    with slim.width(net, 0.75):
        assert net.bn.slim_key not in net.bn.slim_calibrated


def test_snet_calibration_overwrites_only_that_widths_private_statistics() -> None:
    net = slim.convert(Small(), widths=[0.5, 1.0])
    other = net.bn.bns[1].running_mean.clone()
    slim.calibrate_bn(net, 0.5, [X])
    with torch.no_grad():
        y = F.conv2d(X, net.conv.weight[:4], net.conv.bias[:4], padding=1)
    torch.testing.assert_close(net.bn.bns[0].running_mean, y.mean((0, 2, 3)))
    assert torch.equal(net.bn.bns[1].running_mean, other)
    assert slim.get_width(net) == 1.0


def test_bad_training_options() -> None:
    net = slim.convert(Small(), width_range=(0.25, 1.0))
    with pytest.raises(InvalidValueError, match="at least 2"):
        slim.train(net, [(X, Y)], plain_sgd(), sandwich=1, quiet=True)
    with pytest.raises(InvalidValueError, match="not slimmable"):
        slim.calibrate_bn(Small(), 0.5, [X])
    with pytest.raises(InvalidValueError, match="outside this US-Net's range"):
        slim.calibrate_bn(net, 0.1, [X])


def test_a_trained_supernet_exports_at_every_width(tmp_path) -> None:
    net = slim.convert(prunelab.models.create("resnet20"), width_range=(0.25, 1.0))
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    slim.train(net, data, plain_sgd(0.05), quiet=True)
    for w in (0.25, 0.6, 1.0):
        slim.calibrate_bn(net, w, data)
        small = slim.export(net, w).eval()
        with slim.width(net.eval(), w), torch.no_grad():
            torch.testing.assert_close(small(data[0][0]), net(data[0][0]), rtol=1e-4, atol=1e-5)


def test_autoslim_shrinks_the_group_that_costs_nothing_first() -> None:
    torch.manual_seed(4)
    model = Small()
    with torch.no_grad():
        model.fc.weight[:, 4:] = 0  # conv2's last four channels are never read
    net = slim.convert(model, width_range=(0.25, 1.0)).eval()
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the full net gets all right
    full = slim.macs(net, 1.0)
    target = full / slim.macs(net, {"conv": 8, "conv2": 7})
    found = slim.autoslim(net, [(x, y)], speedup=target)
    assert found == {"conv": 8, "conv2": 7}


def test_autoslim_meets_every_budget_and_keeps_every_group() -> None:
    net = slim.convert(prunelab.models.create("resnet20"), width_range=(0.25, 1.0))
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    full = slim.macs(net, 1.0)
    configs = slim.autoslim(net, data, speedup=[1.5, 3.0], step=0.5)
    spec = slim.spec_of(net)
    floor = dict(zip([g.root for g in spec.groups], spec.counts(0.25), strict=True))
    for speedup, config in zip([1.5, 3.0], configs, strict=True):
        assert slim.macs(net, config) <= full / speedup
        assert all(k >= floor[root] >= 1 for root, k in config.items())
    assert sum(configs[1].values()) < sum(configs[0].values())
    small = slim.export(net.eval(), configs[1]).eval()
    with slim.width(net, configs[1]), torch.no_grad():
        torch.testing.assert_close(small(data[0][0]), net(data[0][0]), rtol=1e-4, atol=1e-5)
    assert slim.get_width(net) == 1.0


def test_autoslim_bad_budgets() -> None:
    net = slim.convert(Small(), width_range=(0.5, 1.0))
    with pytest.raises(InvalidValueError, match=r"out of reach: this US-Net goes from 1x to"):
        slim.autoslim(net, [(X, Y)], speedup=50)
    with pytest.raises(InvalidValueError, match=">= 1"):
        slim.autoslim(net, [(X, Y)], speedup=0.5)
    with pytest.raises(InvalidValueError, match="needs a US-Net"):
        slim.autoslim(slim.convert(Small(), widths=[0.5, 1.0]), [(X, Y)], speedup=1.5)


def test_autoslim_method_reaches_its_speedup() -> None:
    model = prunelab.models.create("resnet20")
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    before = prunelab.measure(model, data[0][0][:1])
    prunelab.prune(model, "autoslim", speedup=2.0, data=data,
                   supernet_epochs=1, step=0.5, search_batches=1)
    after = prunelab.measure(model, data[0][0][:1])
    assert before.flops / after.flops >= 2.0
    assert model(data[0][0]).shape == (8, 10)
    assert structure_of(model)  # an ordinary structurally pruned model: saves and reloads
    with pytest.raises(InvalidValueError, match="takes a target of speedup or latency"):
        prunelab.prune(prunelab.models.create("resnet20"), "autoslim", 0.5, data=data)


def test_slimmable_method_trains_a_supernet_and_exports_the_widest_width_meeting_the_target(
) -> None:
    from prunelab.methods import METHODS
    from prunelab.metrics import measure
    from prunelab.training import train

    torch.manual_seed(0)
    method = METHODS.get("slimmable").create(min_width=0.25)
    net = method.training_model(Small(), X[:1])
    assert slim.is_slimmable(net) and not slim.is_slimmable(Small())
    train(net, [(X, Y)] * 3, plain_sgd(), callbacks=method.training_callbacks(), quiet=True)
    dense_macs = measure(copy.deepcopy(net).eval(), X[:1]).macs
    expected = copy.deepcopy(net)
    prunelab.prune(net, "slimmable", speedup=2.0, data=[(X, Y)])
    assert not slim.is_slimmable(net) and structure_of(net)
    ratio = dense_macs / measure(net, X[:1]).macs
    assert ratio >= 2.0
    # The widest width: one more channel per group would miss the target.
    spec = slim.spec_of(expected)
    assert spec.macs(1.0) / spec.macs(min(1.0, net.conv.out_channels / 8 + 1 / 8)) < 2.0
    with pytest.raises(InvalidValueError, match="out of reach"):
        prunelab.prune(method.training_model(Small(), X[:1]), "slimmable", speedup=100.0,
                       data=[(X, Y)])
    with pytest.raises(InvalidValueError, match="prunes a supernet"):
        prunelab.prune(Small(), "slimmable", speedup=2.0, data=[(X, Y)])


def test_slimmable_method_ablations_shared_bn_and_no_calibration() -> None:
    from prunelab.methods import METHODS
    from prunelab.training import train

    naive = METHODS.get("slimmable").create(widths=[0.5, 1.0], switchable_bn=False)
    net = naive.training_model(Small(), X[:1])
    assert not any(isinstance(m, slim.layers.SwitchableBatchNorm) for m in net.modules())
    snet = METHODS.get("slimmable").create(widths=[0.5, 1.0]).training_model(Small(), X[:1])
    assert any(isinstance(m, slim.layers.SwitchableBatchNorm) for m in snet.modules())

    torch.manual_seed(0)
    method = METHODS.get("slimmable").create(min_width=0.25)
    net = method.training_model(Small(), X[:1])
    train(net, [(X, Y)] * 3, plain_sgd(), callbacks=method.training_callbacks(), quiet=True)
    shifted = [(X * 3 + 1, Y)]  # calibration data with other statistics than training's
    kept = METHODS.get("slimmable").create(min_width=0.25, calibrate_bn=False)
    calibrated = prunelab.prune(copy.deepcopy(net), "slimmable", speedup=2.0, data=shifted)
    uncalibrated = prunelab.prune(copy.deepcopy(net), kept, speedup=2.0, data=shifted)
    width = calibrated.bn.num_features
    assert uncalibrated.bn.num_features == width
    torch.testing.assert_close(uncalibrated.bn.running_mean, net.bn.running_mean[:width])
    assert not torch.allclose(calibrated.bn.running_mean, uncalibrated.bn.running_mean)
    with pytest.raises(InvalidValueError, match="S-Net ablation"):
        METHODS.get("slimmable").create(switchable_bn=False)
    with pytest.raises(InvalidValueError, match="US-Net ablation"):
        METHODS.get("slimmable").create(widths=[0.5, 1.0], calibrate_bn=False)
