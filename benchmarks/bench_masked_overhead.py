"""Masked-training overhead: SGD step time of ResNet-20 with 90% masks vs dense (batch 128, 32x32).

Steps of the two models alternate in one process so noise affects both alike; the median step
time of each is reported. Target: masked / dense <= 1.10.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import prunelab
from prunelab.training import TrainRecipe

from common import median, report


def make(masked: bool, channels_last: bool):
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20", num_classes=10)
    if masked:
        prunelab.prune(model, "magnitude", 0.9)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = TrainRecipe(lr=0.1, weight_decay=1e-4).make_optimizer(model)
    return model.train(), optimizer


def step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for channels_last in (True, False):
        x = torch.randn(args.batch_size, 3, 32, 32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,))
        dense, masked = make(False, channels_last), make(True, channels_last)
        times: dict[str, list[float]] = {"dense": [], "masked": []}
        for i in range(args.steps + 3):
            for name, (model, opt) in (("dense", dense), ("masked", masked)):
                start = time.perf_counter()
                step(model, opt, x, y)
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - start)
        ratio = median(times["masked"]) / median(times["dense"])
        rows.append({
            "layout": "channels_last" if channels_last else "NCHW",
            "dense_ms": 1e3 * median(times["dense"]),
            "masked_ms": 1e3 * median(times["masked"]),
            "ratio": ratio,
        })
    report("masked_overhead", "ResNet-20 training step, 90% masks vs dense", rows,
           {"target_ratio": 1.10, "steps": args.steps, "batch_size": args.batch_size,
            "threads": args.threads})


if __name__ == "__main__":
    main()
