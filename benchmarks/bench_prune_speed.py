"""Pruning speed: global magnitude to 90% on torchvision ResNet-50, vs torch.nn.utils.prune.

Both runs start from copies of the same model, and the masks are compared entry by entry.
Target: prunelab no slower (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunelab
from prunelab.sparsity import get_mask, prunable_weights

from common import median, report, timed


def torch_global(model: nn.Module, amount: float) -> None:
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=amount
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torchvision.models.resnet50()
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        ours.append(timed(lambda a=a: prunelab.prune(a, "magnitude", args.sparsity)))
        theirs.append(timed(lambda b=b: torch_global(b, args.sparsity)))
    layers_b = [m for m in b.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    differing = sum(
        int((get_mask(w.module) != layer.weight_mask).sum())
        for w, layer in zip(prunable_weights(a), layers_b, strict=True)
    )
    total = sum(w.numel() for w in prunable_weights(a))
    rows = [
        {"implementation": "prunelab.prune(magnitude, global)", "median_s": median(ours),
         "min_s": min(ours)},
        {"implementation": "torch.nn.utils.prune.global_unstructured", "median_s": median(theirs),
         "min_s": min(theirs)},
    ]
    ratio = median(ours) / median(theirs)
    print(f"ratio prunelab / torch = {ratio:.3f} (target <= 1.0); "
          f"mask entries that differ: {differing} of {total}")
    report("prune_speed", "Global magnitude pruning of ResNet-50 to 90%", rows,
           {"ratio": ratio, "differing_mask_entries": differing, "prunable_weights": total,
            "threads": args.threads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
