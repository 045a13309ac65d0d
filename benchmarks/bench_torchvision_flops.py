"""FLOPs and parameters of every torchvision classification model against torchvision's metadata.

torchvision records ``_ops`` (GMACs at the weights' evaluation crop size, batch 1) and
``num_params`` for each model's DEFAULT weights; both come with the package. Each model is built
untrained on the meta device (no memory, no arithmetic) and counted with
``prunelab.metrics.count_flops``; ``--cpu NAME ...`` also counts those models for real on the CPU
through ``prunelab.measure`` (where attention's eval fast path and flash attention run).
The slow test tests/test_torchvision_flops.py asserts the same within 3%.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torchvision.models import get_model, get_model_weights, list_models

import prunelab
from prunelab.metrics import count_flops

from common import report


def build(name: str, device: str) -> tuple[torch.nn.Module, torch.Tensor, object]:
    """The model as its DEFAULT weights define it (untrained), and an input of their crop size."""
    weights = get_model_weights(name).DEFAULT
    crop = weights.transforms().crop_size
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    if name.startswith("vit"):
        kwargs["image_size"] = crop[0]
    try:
        with torch.device(device):
            model = get_model(name, **kwargs)
    except NotImplementedError:  # RegNets compute their widths with tensors
        model = get_model(name, **kwargs).to(device)
    return model.eval(), torch.zeros(1, 3, crop[0], crop[-1], device=device), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", nargs="*", default=["vit_b_16", "vit_b_32", "swin_t",
                                                     "maxvit_t"])
    args = parser.parse_args()
    rows = []
    for name in list_models(module=torchvision.models):
        model, x, weights = build(name, "meta")
        gmacs = count_flops(model, x).flops / 2e9
        params = sum(p.numel() for p in model.parameters())
        row = {"model": name, "input": x.shape[-1], "published_gmacs": weights.meta["_ops"],
               "gmacs": round(gmacs, 4),
               "error_pct": round(100 * (gmacs / weights.meta["_ops"] - 1), 3),
               "params_match": params == weights.meta["num_params"]}
        if name in args.cpu:
            model, x, _ = build(name, "cpu")
            start = time.perf_counter()
            row["cpu_gmacs"] = round(prunelab.measure(model, x).macs / 1e9, 4)
            row["cpu_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    worst = max(abs(r["error_pct"]) for r in rows)
    within = sum(abs(r["error_pct"]) <= 3 for r in rows)
    report("torchvision_flops", f"torchvision MACs: {within}/{len(rows)} within 3% "
           f"(worst {worst:.2f}%), params {sum(r['params_match'] for r in rows)}/{len(rows)}",
           rows)


if __name__ == "__main__":
    main()
