"""Slimmable networks on CPU: what a supernet step costs, and how fast exported widths run.

1. Training cost: one S-Net step over 4 widths (0.25, 0.5, 0.75, 1.0: the losses of all four on
   one batch, one optimiser step) against 4 plain steps, one at each width of the same supernet,
   and against one step of each of the 4 exported (physically narrow) networks: the cost of
   training the 4 networks individually. All through prunelab's train loop, same batches,
   alternating in one run; median of repeats, ms per step.
2. Exported speed: latency of the exported uniform widths of MobileNetV2-CIFAR at batch 64
   against the full network; measured speed-up / MACs speed-up (the issue asks >= 0.8 at 0.5x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prunelab
from prunelab import slim
from prunelab.metrics import measure_latency
from prunelab.training import TrainRecipe, train

from common import report

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def timed_steps(run, steps: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000 / steps


def training_cost(model_name: str, steps: int, repeats: int, batch: int) -> list[dict]:
    torch.manual_seed(0)
    net = slim.convert(prunelab.models.create(model_name), widths=WIDTHS)
    batches = [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))
               for _ in range(steps)]
    recipe = TrainRecipe(epochs=1, batch_size=batch, lr=0.01, schedule="constant")
    exported = [slim.export(net, w) for w in WIDTHS]
    times: dict[str, list[float]] = {"sandwich": [], "plain": [], "individual": []}

    def plain() -> None:
        for w in WIDTHS:
            with slim.width(net, w):
                train(net, batches, recipe, quiet=True)

    def individual() -> None:
        for model in exported:
            train(model, batches, recipe, quiet=True)

    for _ in range(repeats):
        times["sandwich"].append(timed_steps(
            lambda: slim.train(net, batches, recipe, quiet=True), steps))
        times["plain"].append(timed_steps(plain, steps))
        times["individual"].append(timed_steps(individual, steps))
    sandwich = statistics.median(times["sandwich"])
    rows = []
    for kind, label in (("sandwich", "1 S-Net step, 4 widths"),
                        ("plain", "4 plain steps, one per width (supernet)"),
                        ("individual", "4 steps, one per exported narrow net")):
        value = statistics.median(times[kind])
        rows.append({"model": model_name, "what": label, "ms per step": round(value, 1),
                     "relative to S-Net step": round(value / sandwich, 3)})
    return rows


def exported_speed(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = slim.convert(prunelab.models.create("mobilenetv2-cifar"), widths=WIDTHS).eval()
    x = torch.randn(batch, 3, 32, 32)
    full = slim.export(net, 1.0).eval()
    base = measure_latency(full, x, repeats=repeats).median_ms
    rows = []
    for w in WIDTHS:
        small = slim.export(net, w).eval()
        ms = measure_latency(small, x, repeats=repeats).median_ms
        theory = slim.macs(net, 1.0) / slim.macs(net, w)
        rows.append({"model": "mobilenetv2-cifar", "width": w, "batch": batch,
                     "MACs": slim.macs(net, w), "latency ms": round(ms, 2),
                     "MACs speed-up": round(theory, 3), "measured speed-up": round(base / ms, 3),
                     "measured / MACs": round(base / ms / theory, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--latency-batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = training_cost(args.model, args.steps, args.repeats, args.batch)
    report("slim_training_cost", "S-Net step (4 widths) vs 4 plain steps, CPU", rows)
    speed = exported_speed(args.latency_batch, 20)
    report("slim_exported_speed", "Exported MobileNetV2-CIFAR widths, CPU latency", speed)


if __name__ == "__main__":
    main()
