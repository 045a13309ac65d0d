"""A small sweep used by the harness benchmarks: digits, LeNet-300-100, 8 runs."""

from __future__ import annotations

from prunelab.bench import SweepSpec
from prunelab.config import validate


def small_sweep(epochs: int = 20, finetune_epochs: int = 15, seeds: tuple[int, ...] = (0,),
                threads: int | None = None) -> SweepSpec:
    return validate(SweepSpec, {
        "name": "harness",
        "model": "lenet-300-100",
        "dataset": "digits",
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine"},
        "finetune": {"epochs": finetune_epochs, "batch_size": 32, "lr": 0.01,
                     "schedule": "cosine"},
        "latency": {"repeats": 20},
        "threads": threads,
        "grid": {"methods": ["magnitude", "random"],
                 "targets": {"sparsity": [0.5, 0.7, 0.8, 0.9]}, "seeds": list(seeds)},
    })
