"""SNIP at 98% sparsity on LeNet-300-100 / LeNet-5 (MNIST) with the paper's training recipe.

Lee et al. (2019) report 2.4% test error (LeNet-300-100) and 0.8% (LeNet-5-Caffe) at 98%. Their
public code (namhoonlee/snip-public) trains the pruned net with SGD, momentum 0.9, batch 100,
learning rate 0.1 divided by 10 every 25k iterations, an L2 penalty of 0.00025·Σw² (weight decay
5e-4), weights initialised by TensorFlow's variance scaling (truncated normal, std 1/√fan-in) and
biases at zero. This script prunes once with prunelab's ``snip`` on one batch of 100 training
images, then trains the sparse net, by default from the same weights; ``--after-pruning fresh``
does what the public code does instead: the mask is found on one initialisation and a second,
independent one (variance scaling, biases zero) trains under it. ``--rank-biases`` also does what
the public code does before pruning: the biases are initialised by variance scaling too (std
1/√units) and ranked with the weights, so the 98% counts weights and biases together and a
pruned bias stays zero.

Candidate settings (initialisation, weight decay) are compared on seed 0's *validation* error
(10% of the training set, as in the paper); the chosen one then runs on every seed and its test
error is reported. The epoch count is fixed in advance (the last epoch is taken).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
from torch import nn

import prunelab
from prunelab.recoveries.rewind import rewind_weights
from prunelab.sparsity import register_prunable
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from common import report

PAPER_ERROR = {"lenet-300-100": 2.4, "lenet-5": 0.8}
FRESH_SEED_OFFSET = 10_000  # the second initialisation is an independent draw


def recipe(epochs: int, weight_decay: float, iterations_per_epoch: int) -> TrainRecipe:
    """The paper's step schedule (÷10 every 25k iterations) as fractions of ``epochs``."""
    total = epochs * iterations_per_epoch
    milestones = [k * 25_000 / total for k in range(1, math.ceil(total / 25_000))]
    return TrainRecipe(epochs=epochs, batch_size=100, lr=0.1, momentum=0.9,
                       weight_decay=weight_decay, schedule="step", milestones=milestones,
                       gamma=0.1, channels_last=False)


def variance_scaling_(model: nn.Module, biases: bool = False) -> None:
    """TensorFlow's default variance scaling: truncated normal (±2σ) with std 1/√fan-in (the
    truncation correction 0.8796 keeps the std); biases zero, or with ``biases`` drawn the same
    way with TensorFlow's fan-in of a vector, its length."""
    def draw(tensor: torch.Tensor, fan_in: int) -> None:
        std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            draw(module.weight, module.weight[0].numel())
            if biases:
                draw(module.bias, module.bias.numel())
            else:
                nn.init.zeros_(module.bias)


def error(model: nn.Module, bundle, split: str) -> float:
    return 100.0 - prunelab.evaluate(model, bundle.loader(split, 1000), topk=(1,))["top1"]


def initialised(model_name: str, init: str, seed: int, biases: bool = False) -> nn.Module:
    seed_everything(seed)
    model = prunelab.models.create(model_name, input_shape=(1, 28, 28))
    if init == "variance-scaling":
        variance_scaling_(model, biases)
    return model


def one_run(seed: int, bundle, model_name: str, init: str, weight_decay: float,
            epochs: int, sparsity: float, after_pruning: str, rank_biases: bool) -> dict:
    model = initialised(model_name, init, seed, biases=rank_biases)
    batches = bundle.loader("train", 100, shuffle=True, seed=seed)
    prunelab.prune(model, "snip", sparsity=sparsity, data=[next(iter(batches))])
    if after_pruning == "fresh":
        fresh = initialised(model_name, init, seed + FRESH_SEED_OFFSET)
        rewind_weights(model, fresh.state_dict())
    steps = math.ceil(bundle.sizes["train"] / 100)
    result = train(model, batches, recipe(epochs, weight_decay, steps), quiet=True)
    return {"seed": seed, "model": model_name, "init": init, "weight_decay": weight_decay,
            "epochs": epochs, "after_pruning": after_pruning, "rank_biases": rank_biases,
            "val_error": error(model, bundle, "val"),
            "test_error": error(model, bundle, "test"), "minutes": result.seconds / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="lenet-300-100", choices=sorted(PAPER_ERROR))
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--epochs", type=int, default=60,
                        help="default 60: ~32k iterations, the paper's ÷10 at 25k included")
    parser.add_argument("--inits", nargs="+", default=["torch", "variance-scaling"],
                        choices=["torch", "variance-scaling"])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 5e-4])
    parser.add_argument("--after-pruning", nargs="+", default=["same"], choices=["same", "fresh"],
                        help="train the scored weights (same) or a second initialisation under "
                        "the mask (fresh, as the public code); several: chosen on validation")
    parser.add_argument("--rank-biases", action="store_true",
                        help="initialise biases by variance scaling and rank them with the "
                        "weights (the public code's masks cover biases too)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default=None, help="results file name")
    args = parser.parse_args()
    if args.rank_biases:
        for layer in (nn.Linear, nn.Conv2d):
            register_prunable(layer, ["weight", "bias"])
    bundle = prunelab.data.load("mnist", val_fraction=0.1, split_seed=0)
    first, *others = args.seeds
    candidates = [one_run(first, bundle, args.model, init, wd, args.epochs, args.sparsity, after,
                          args.rank_biases)
                  for init, wd, after in itertools.product(args.inits, args.weight_decays,
                                                           args.after_pruning)]
    chosen = min(candidates, key=lambda r: r["val_error"])
    for row in candidates:
        print(f"init {row['init']}, weight decay {row['weight_decay']:g}, after pruning "
              f"{row['after_pruning']}: validation error {row['val_error']:.2f}%"
              f"{'  <- chosen' if row is chosen else ''}")
    rows = [chosen] + [one_run(s, bundle, args.model, chosen["init"], chosen["weight_decay"],
                               args.epochs, args.sparsity, chosen["after_pruning"],
                               args.rank_biases)
                       for s in others]
    summary = {key: (statistics.mean(r[key] for r in rows),
                     statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0)
               for key in ("val_error", "test_error")}
    print(f"{args.model} SNIP {args.sparsity:.0%}: test error {summary['test_error'][0]:.2f} ± "
          f"{summary['test_error'][1]:.2f}% (paper {PAPER_ERROR[args.model]}%)")
    report(args.name or f"snip_mnist_{args.model.replace('-', '_')}",
           f"SNIP at {args.sparsity:.0%} on {args.model} / MNIST (paper recipe)", rows,
           {"summary_mean_std": summary, "selection_seed0": candidates,
            "paper_test_error": PAPER_ERROR[args.model], "args": vars(args),
            "data": bundle.source, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
