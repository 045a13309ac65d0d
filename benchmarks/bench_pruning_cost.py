"""Pruning cost: wall time of each channel method's pruning step on ResNet-56 (no fine-tuning).

Two targets: 30% of the channels of every prunable group (one pass), and a 2x FLOPs reduction
(a search over the ratio, pruning and measuring copies). Data-driven methods get 8 calibration
batches of 64 CIFAR-shaped images.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import prunelab
from prunelab.methods import METHODS
from prunelab.metrics import measure

from common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = prunelab.models.create(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (64,), generator=generator)) for _ in range(8)]
    dense_flops = measure(base, data[0][0][:1]).flops
    rows = []
    for name, cls in METHODS.items():
        if cls.granularity != "channel":
            continue
        row = {"method": name}
        targets = (("ratio_0.3_s", {"sparsity": 0.3}), ("speedup_2x_s", {"speedup": 2.0}))
        for label, target in targets:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            prunelab.prune(model, name, data=data, **target)
            row[label] = time.perf_counter() - start
            if "speedup" in target:
                row["reached_speedup"] = dense_flops / measure(model, data[0][0][:1]).flops
        rows.append(row)
        print(row, flush=True)
    report("pruning_cost", f"Pruning step wall time on {args.model}", rows,
           {"threads": args.threads, "calibration": "8 batches x 64"})


if __name__ == "__main__":
    main()
