"""Layer collapse at initialisation (Tanaka et al. 2020, Fig. 1): the largest compression of the
prunable weights each method reaches, pruning globally and without training, before some layer
is left with no weight.

For a method that scores once (random, magnitude, SNIP, GraSP) this is exact from the scores:
pruning the k lowest empties layer l as soon as k reaches the rank of l's best score, so the
largest collapse-free k is min over layers of that rank, minus one. SynFlow re-scores over its
100 rounds, so its limit is searched by bisection on log10(compression), pruning a fresh copy
each time. SNIP and GraSP score one batch of ``--batch`` CIFAR-10 training images.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

import prunelab
from prunelab import data as datasets
from prunelab import models
from prunelab.methods import METHODS
from prunelab.sparsity import collapsed_layers, prunable_weights

from common import report

ONE_SHOT = ("random", "magnitude", "snip", "grasp")


def exact_limit(model: torch.nn.Module, method: str, batch: list) -> tuple[float, str]:
    """Largest compression before collapse from one set of global scores, and the layer that
    collapses first."""
    weights = prunable_weights(model)
    scores = METHODS.get(method).create().scores(model, weights, batch)
    flat = torch.cat([s.detach().double().reshape(-1) for s in scores])
    order = torch.empty_like(flat, dtype=torch.long)
    order[flat.argsort(stable=True)] = torch.arange(flat.numel())
    ranks = []  # 1-based position of each layer's best score in the ascending order
    start = 0
    for s in scores:
        ranks.append(int(order[start:start + s.numel()].max()) + 1)
        start += s.numel()
    first = min(range(len(ranks)), key=ranks.__getitem__)
    total, k = flat.numel(), ranks[first] - 1
    for pruned, collapses in ((k, False), (k + 1, True)):  # check against real pruning
        trial = prunelab.prune(copy.deepcopy(model), method, pruned / total, data=batch)
        assert bool(collapsed_layers(trial)) == collapses, (method, pruned)
    return total / (total - k), weights[first].name


def synflow_limit(model: torch.nn.Module, rounds: int, tolerance: float, low: float,
                  high: float) -> tuple[float, str, str]:
    """Bisection on log10(compression) for SynFlow (collapse is monotone in the target), from
    ``low`` (known collapse-free) to ``high`` (known collapsed); returns the highest
    collapse-free log10 found, the points tested and the first layer that collapsed."""
    culprit, tested = "", []
    total = sum(w.numel() for w in prunable_weights(model))
    while high - low > tolerance:
        mid = (low + high) / 2
        sparsity = 1 - 10 ** -mid
        if round(sparsity * total) >= total:
            high = mid
            continue
        trial = prunelab.prune(copy.deepcopy(model), "synflow", sparsity, rounds=rounds)
        collapsed = collapsed_layers(trial)
        print(f"  synflow 10^{mid:.3f}: {'collapsed ' + collapsed[0] if collapsed else 'ok'}",
              flush=True)
        tested.append(f"10^{mid:.3f} {'collapsed' if collapsed else 'ok'}")
        if collapsed:
            high, culprit = mid, collapsed[0]
        else:
            low = mid
    return low, "bisection: " + ", ".join(tested), culprit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="vgg16-cifar,resnet20")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=0.05, help="in log10 units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join((*ONE_SHOT, "synflow")))
    parser.add_argument("--search", type=float, nargs=2, default=(0.0, 6.0),
                        metavar=("LOW", "HIGH"),
                        help="SynFlow's bracket in log10(compression): LOW collapse-free, HIGH "
                             "collapsed (continue an earlier search with its bracket)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    bundle = datasets.load("cifar10")
    x, y = next(iter(bundle.loader("train", args.batch, shuffle=True, seed=args.seed)))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = models.create(name)
        total = sum(w.numel() for w in prunable_weights(model))
        for method in args.methods.split(","):
            if method == "synflow":
                low, how, layer = synflow_limit(model, args.rounds, args.tolerance,
                                                *args.search)
                limit = 10 ** low
            else:
                limit, layer = exact_limit(model, method, [(x, y)])
                how = "exact"
            rows.append({"model": name, "method": method, "max_compression": limit,
                         "log10": math.log10(limit), "first_collapsed_layer": layer,
                         "how": how, "prunable_weights": total})
            print(rows[-1], flush=True)
    suffix = "_" + "_".join([*args.models.split(","), *args.methods.split(",")])
    report(f"layer_collapse{suffix}",
           "Largest compression before a layer collapses (at init, global)", rows,
           {"batch": args.batch, "rounds": args.rounds, "seed": args.seed})


if __name__ == "__main__":
    main()
