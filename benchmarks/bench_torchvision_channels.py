"""Channel pruning of 11 torchvision architectures, each removal checked against the masked model.

Each model is built untrained (weights=None, seed 0), 30% of its channels are removed with
``l2-channel`` (global scope) on a small input (64x64; 224x224 for ViT, whose patch grid is
fixed), and the table gives parameters and MACs before and after, the largest difference
between the smaller model's output and the masked model's (same channels zeroed) that the
removal check measured, and the channel groups left whole with the reason (LayerNorm, attention,
channel shuffle). The slow test tests/test_removal_check.py asserts the same for every model.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import prunelab
from prunelab.metrics import count_flops, count_parameters
from prunelab.structured import structure_of

from common import report

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
          "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "convnext_tiny",
          "vit_b_16"]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The untrained model and its example input."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 224 if name.startswith("vit") else 64
    return model, torch.randn(1, 3, size, size)


def prune(name: str, ratio: float = 0.3) -> dict:
    """Prune one model; the measured row."""
    model, x = build(name)
    params, macs = count_parameters(model)[0], count_flops(model, x).flops / 2
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prunelab.prune(model, "l2-channel", ratio, example_input=x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        runs = tuple(model(x).shape) == (1, 1000)
    check = structure_of(model)[-1]["check"]
    return {"model": name, "input": x.shape[-1], "params": params,
            "params_after": count_parameters(model)[0], "MACs": macs,
            "MACs_after": count_flops(model, x).flops / 2, "max_diff": check["max_diff"],
            "output_scale": check["scale"], "runs": runs, "seconds": round(seconds, 1),
            "left_whole": "; ".join(str(w.message).split(",")[0] for w in caught)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [prune(name) for name in args.models]
    report("torchvision_channels", "l2-channel 30% on torchvision models, removal checked", rows)


if __name__ == "__main__":
    main()
