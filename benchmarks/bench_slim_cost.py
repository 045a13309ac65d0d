"""Slimmable networks on CPU: what a supernet step costs, and how fast exported widths run.

1. Training cost: one S-Net step over 4 widths (0.25, 0.5, 0.75, 1.0: the losses of all four on
   one batch, one optimiser step) against 4 plain steps, one at each width of the same supernet,
   and against one step of each of the 4 exported (physically narrow) networks: the cost of
   training the 4 networks individually. All through prunelab's train loop, same batches,
   alternating in one run; median of repeats, ms per step.
2. Exported speed: latency of the exported uniform widths of MobileNetV2-CIFAR at batch 64
   against the unconverted base model, eager (``measure_latency``) and as served by
   ``prunelab.deploy`` on each backend (BatchNorm folded; torch: layout chosen; onnxruntime,
   OpenVINO: their graph optimisations fuse the elementwise work); measured speed-up / MACs
   speed-up (the issue asks >= 0.8 at 0.5x). Every model is timed once per round, rounds
   alternate, and each model's median over rounds is kept, so a load change hits all alike.
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


class Served(torch.nn.Module):
    """A deployed model as a module, so ``measure_latency`` times exactly what it serves (its
    input layout conversion included)."""

    def __init__(self, deployed):
        super().__init__()
        self.deployed = deployed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deployed(x)


def exported_speed(batch: int, rounds: int, repeats: int, backends: list[str]) -> list[dict]:
    from prunelab.deploy import deploy

    torch.manual_seed(0)
    base = prunelab.models.create("mobilenetv2-cifar").eval()
    net = slim.convert(base, widths=WIDTHS).eval()
    x = torch.randn(batch, 3, 32, 32)
    models = {"base": base, **{w: slim.export(net, w).eval() for w in WIDTHS}}
    modes = {"eager": models}
    for backend in backends:
        modes[backend] = {key: Served(deploy(model, x, backend=backend, threads=2))
                          for key, model in models.items()}
    times: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for mode, runs in modes.items():
            for key, model in runs.items():
                times.setdefault((key, mode), []).append(
                    measure_latency(model, x, repeats=repeats).median_ms)
    rows = []
    for mode in modes:
        reference = statistics.median(times[("base", mode)])
        for w in WIDTHS:
            ms = statistics.median(times[(w, mode)])
            theory = slim.macs(net, 1.0) / slim.macs(net, w)
            rows.append({"model": "mobilenetv2-cifar", "mode": mode, "width": w, "batch": batch,
                         "MACs": slim.macs(net, w), "base ms": round(reference, 2),
                         "latency ms": round(ms, 2), "MACs speed-up": round(theory, 3),
                         "measured speed-up": round(reference / ms, 3),
                         "measured / MACs": round(reference / ms / theory, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["cost", "speed", "both"], default="both")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="torch,onnxruntime,openvino",
                        help="deploy backends timed besides the eager model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("cost", "both"):
        rows = training_cost(args.model, args.steps, args.repeats, args.batch)
        report("slim_training_cost", "S-Net step (4 widths) vs 4 plain steps, CPU", rows)
    if args.part in ("speed", "both"):
        speed = exported_speed(args.latency_batch, args.rounds, 10,
                               [b for b in args.backends.split(",") if b])
        report("slim_exported_speed", "Exported MobileNetV2-CIFAR widths, CPU latency", speed)


if __name__ == "__main__":
    main()
