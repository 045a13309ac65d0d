"""Every torchvision classification model against its published multiply-adds (slow).

torchvision's weight metadata records ``_ops`` (GMACs at the weights' evaluation crop size) and
``num_params``; both are read from the installed package, no download needed. The sweep counts on
the meta device (no memory, no arithmetic); the transformers are also counted for real on the CPU,
where attention's eval fast path and flash attention run (they escaped the counter before).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import get_model, get_model_weights, list_models

import prunelab
from prunelab.metrics import count_flops

pytestmark = pytest.mark.slow

MODELS = list_models(module=torchvision.models)


def build(name: str, device: str = "meta") -> tuple[torch.nn.Module, torch.Tensor, object]:
    """The model as its DEFAULT weights define it (untrained), and an input of their crop size."""
    weights = get_model_weights(name).DEFAULT
    crop = weights.transforms().crop_size
    kwargs = {"aux_logits": False} if name == "googlenet" else {}  # as the weights build it
    if name.startswith("vit"):
        kwargs["image_size"] = crop[0]  # vit_h_14's SWAG weights are for 518 x 518
    try:
        with torch.device(device):
            model = get_model(name, **kwargs)
    except NotImplementedError:  # RegNets compute their widths with tensors
        model = get_model(name, **kwargs).to(device)
    x = torch.zeros(1, 3, crop[0], crop[-1], device=device)
    return model.eval(), x, weights


@pytest.mark.parametrize("name", MODELS)
def test_macs_and_params_match_torchvision(name: str) -> None:
    model, x, weights = build(name)
    gmacs = count_flops(model, x).flops / 2e9
    assert gmacs == pytest.approx(weights.meta["_ops"], rel=0.03)
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]


@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32", "swin_t", "maxvit_t"])
def test_transformers_on_cpu_match_torchvision(name: str) -> None:
    model, x, weights = build(name, "cpu")
    assert prunelab.measure(model, x).macs / 1e9 == pytest.approx(weights.meta["_ops"], rel=0.03)


def test_pruned_vit_speedup_keeps_attention_products_dense() -> None:
    model, x, _ = build("vit_b_16", "cpu")
    torch.nn.init.normal_(model.heads.head.weight)  # zeros at initialisation
    dense = prunelab.measure(model, x)
    prunelab.prune(model, "magnitude", 0.9, scope="layer")
    pruned = prunelab.measure(model, x)
    tokens, width, layers = 197, 768, 12
    products = layers * 2 * tokens**2 * width  # q·k and attention·v MACs: no weight in them
    densities = [float(w.weight.count_nonzero() / w.numel())
                 for w in prunelab.sparsity.prunable_weights(model)]
    assert len(densities) == 50 and densities == pytest.approx([0.1] * 50, abs=1e-5)
    expected = dense.macs / (0.1 * (dense.macs - products) + products)
    assert pruned.theoretical_speedup == pytest.approx(expected, rel=1e-4)
