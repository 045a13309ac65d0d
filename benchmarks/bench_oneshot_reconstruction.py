"""One-shot pruning without fine-tuning: LeNet-300-100 on MNIST or the shipped converged
ResNet-20 on CIFAR-10, and the cost of SparseGPT.

Part 1 trains a dense LeNet-300-100 (a few epochs, the epoch kept by validation accuracy), or with
``--model resnet20`` loads the shipped ResNet-20 (``pretrained="cifar10"``), then prunes copies
of it once, with no fine-tuning, at 50-90% sparsity and with 2:4, by magnitude
(global and per layer), OBD (empirical Fisher, global), Wanda and SparseGPT-style OBS, each
calibrated on ``--calibration`` training samples drawn with several seeds. It reports test error
(mean ± std over calibration seeds; magnitude needs no data, so its std is 0).

Part 2 times ``prunelab.prune(layer, "sparsegpt", 0.5)`` on one Linear layer with 4096 inputs and
1024 outputs (a 1024x4096 weight) given 128 calibration sequences of ``--tokens`` tokens, against
one forward pass of the layer over the same data, and reports the solver's memory estimate and the
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
from functools import partial

import torch
from torch import nn

import prunelab
from prunelab.methods.layerwise import memory_estimate
from prunelab.methods.sparsegpt import obs_solve
from prunelab.sparsity import prunable_weights
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from common import median, report, timed

DENSE = TrainRecipe(epochs=8, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                    channels_last=False)
# (method, scope); scope "magnitude-allocation" prunes each layer to the sparsity global
# magnitude pruning gave it (layer_sparsity overrides), separating *which* weights a method
# removes from *how many per layer*.
# blocksize 1024 (wider than every LeNet layer): the mask is chosen once per layer instead of
# per block of 128 input columns (SparseGPT's adaptive selection gives every block the same
# sparsity, while MNIST's border pixels are nearly always zero).
METHODS = [("magnitude", "global", {}), ("magnitude", "layer", {}), ("obd", "global", {}),
           ("obd", "layer", {}), ("wanda", "layer", {}), ("sparsegpt", "layer", {}),
           ("sparsegpt", "layer", {"blocksize": 1024}),
           ("wanda", "magnitude-allocation", {}), ("sparsegpt", "magnitude-allocation", {}),
           ("sparsegpt", "magnitude-allocation", {"blocksize": 1024})]


def test_error(model: nn.Module, bundle) -> float:
    return 100.0 - prunelab.evaluate(model, bundle.loader("test", 1000), topk=(1,))["top1"]


def calibration(bundle, samples: int, seed: int) -> list:
    batches = []
    for x, y in bundle.loader("train", 128, shuffle=True, seed=seed):
        batches.append((x, y))
        if sum(len(b[1]) for b in batches) >= samples:
            return batches
    return batches


def magnitude_allocation(dense: nn.Module, sparsity: float, exclude: list[str]
                         ) -> dict[str, float]:
    """Per-layer sparsities that global magnitude pruning chooses at ``sparsity``."""
    pruned = prunelab.prune(copy.deepcopy(dense), "magnitude", sparsity, scope="global",
                            exclude=exclude)
    return {w.name: float((w.weight == 0).float().mean()) for w in prunable_weights(pruned)
            if w.name not in exclude}


def dense_model(args) -> tuple[nn.Module, object]:
    """The trained dense model and its data."""
    if args.model == "resnet20":
        bundle = prunelab.data.load("cifar10", val_fraction=0.1, split_seed=0)
        return prunelab.models.create("resnet20", pretrained="cifar10").eval(), bundle
    bundle = prunelab.data.load("mnist")
    seed_everything(0)
    dense = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    train(dense, bundle.loader("train", DENSE.batch_size, shuffle=True, seed=0),
          DENSE.model_copy(update={"epochs": args.dense_epochs}),
          val_data=bundle.loader("val", 1000), keep_best=True, quiet=True)
    return dense, bundle


def accuracy_table(args) -> list[dict]:
    dense, bundle = dense_model(args)
    rows = [{"method": "dense", "target": "-", "test_error": test_error(dense, bundle)}]
    targets = [(s, None) for s in args.sparsities] + [(0.5, "2:4")]
    methods = [m for m in METHODS if args.model == "lenet" or "blocksize" not in m[2]]
    # The first convolution stays dense (3 input channels: no 2:4 groups; ShrinkBench's choice).
    exclude = ["conv1"] if args.model == "resnet20" else []
    for method, scope, extra in methods:
        for sparsity, nm in targets:
            if nm is not None and scope != "layer":
                continue  # N:M fixes every group's count: scope and allocation do not apply
            errors, seconds = [], []
            for seed in args.seeds if method != "magnitude" else args.seeds[:1]:
                data = calibration(bundle, args.calibration, seed)
                model = copy.deepcopy(dense)
                options = {"nm": nm, **extra} if nm else dict(extra)
                options["exclude"] = exclude
                if scope == "magnitude-allocation":
                    options["layer_sparsity"] = magnitude_allocation(dense, sparsity, exclude)
                seconds.append(timed(partial(
                    prunelab.prune, model, method, sparsity, data=data, **options,
                    scope="global" if scope == "global" else "layer")))
                errors.append(test_error(model, bundle))
            label = ", ".join([scope, *(f"{k}={v}" for k, v in extra.items())])
            rows.append({
                "method": f"{method} ({label})", "target": nm or f"{sparsity:.0%}",
                "test_error": statistics.mean(errors),
                "std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "seeds": len(errors), "prune_s": median(seconds)})
            print(rows[-1], flush=True)
    return rows


def cost_table(args) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        layer = nn.Linear(4096, 1024)
        # 128 sequences whose features share structure, like a transformer's hidden states.
        mixing = torch.randn(256, 4096) / 16
        data = [torch.randn(16, tokens, 256) @ mixing + 0.1 * torch.randn(16, tokens, 4096)
                for _ in range(8)]
        with torch.no_grad():
            forward = median([timed(partial(list, map(layer, data))) for _ in range(3)])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pruning = median([timed(partial(prunelab.prune, copy.deepcopy(layer), "sparsegpt", 0.5,
                                        data=data)) for _ in range(args.repeats)])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        identity = torch.eye(4096)
        solver_only = median([timed(partial(obs_solve, layer.weight, identity, 0.5))
                              for _ in range(args.repeats)])
        rows.append({"layer": "Linear 4096 -> 1024", "sequences": 128, "tokens_per_sequence":
                     tokens, "forward_s": forward, "sparsegpt_s": pruning,
                     "ratio": pruning / forward, "solver_only_s": solver_only,
                     "estimate_gib": memory_estimate(1024, 4096, 1) / 2**30,
                     "peak_rss_gib": peak / 2**20, "rss_growth_gib": (peak - before) / 2**20})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["accuracy", "cost", "both"], default="both")
    parser.add_argument("--model", choices=["lenet", "resnet20"], default="lenet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--dense-epochs", type=int, default=DENSE.epochs)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("accuracy", "both"):
        name = {"lenet": "LeNet-300-100 / MNIST", "resnet20": "ResNet-20 / CIFAR-10 (shipped)"}
        report(f"oneshot_{args.model}", f"{name[args.model]}, one-shot pruning, no fine-tuning "
               "(test error %)", accuracy_table(args))
    if args.part in ("cost", "both"):
        report("sparsegpt_cost", "SparseGPT on a 1024x4096 Linear, 128 calibration sequences",
               cost_table(args))


if __name__ == "__main__":
    main()
