"""Quality: LeNet-300-100 on MNIST, iterative magnitude pruning + fine-tuning to 12x and 50x.

Han et al. (2015) reached 12x on LeNet-300-100 with no loss (1.64% -> 1.59% test error). Here:
dense training, then rounds of global magnitude pruning (each removing the same fraction of what
is left) with fine-tuning after each, first to 12x and on to 50x. Compression counts every
parameter (params / non-zeros, biases included). Epochs are chosen on the validation split (never
the test set), and so is the fine-tuning learning rate (``--lr-grid``: each candidate is run on
the first seed and the one with the lowest *validation* error at 12x is used for every seed).
Several seeds; mean ± std of the test error. Target: 12x with <= 0.1 point loss.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from functools import partial

import torch

import prunelab
from prunelab.schedules import Pruner, iterative
from prunelab.sparsity import sparsity_for_compression
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from common import report

DENSE = TrainRecipe(epochs=30, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                    channels_last=False)
FINETUNE = TrainRecipe(epochs=6, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                       channels_last=False)


def error(model, bundle, split: str = "test") -> float:
    return 100.0 - prunelab.evaluate(model, bundle.loader(split, 1000), topk=(1,))["top1"]


def one_seed(seed: int, bundle, rounds: tuple[int, int], dense_epochs: int, ft_epochs: int,
             ft_lr: float):
    seed_everything(seed)
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    batches = bundle.loader("train", DENSE.batch_size, shuffle=True, seed=seed)
    val = bundle.loader("val", 1000)
    train(model, batches, DENSE.model_copy(update={"epochs": dense_epochs}), val_data=val,
          keep_best=True, quiet=True, description=f"dense seed {seed}")
    results = {"seed": seed, "dense_error": error(model, bundle)}
    finetune = FINETUNE.model_copy(update={"epochs": ft_epochs, "lr": ft_lr})

    def recover(m):
        train(m, batches, finetune, val_data=val, keep_best=True, quiet=True)

    pruned = copy.deepcopy(model)
    pruner = Pruner("magnitude", scope="global")
    for compression, n_rounds in zip((12, 50), rounds, strict=True):
        # Rounds continue from the current sparsity, each removing the same fraction.
        iterative(pruned, pruner, sparsity_for_compression(pruned, compression), n_rounds, recover)
        m = prunelab.measure(pruned, torch.zeros(1, 1, 28, 28))
        results[f"error_{compression}x"] = error(pruned, bundle)
        results[f"val_error_{compression}x"] = error(pruned, bundle, "val")
        results[f"compression_{compression}x"] = m.compression
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, nargs=2, default=[5, 3],
                        help="rounds to reach 12x, then rounds from 12x to 50x")
    parser.add_argument("--dense-epochs", type=int, default=DENSE.epochs)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE.epochs)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05],
                        help="fine-tuning learning rates; chosen on the first seed's validation")
    parser.add_argument("--name", default="mnist_quality", help="results file name")
    args = parser.parse_args()
    bundle = prunelab.data.load("mnist")
    run = partial(one_seed, bundle=bundle, rounds=tuple(args.rounds),
                  dense_epochs=args.dense_epochs, ft_epochs=args.finetune_epochs)
    first = {lr: run(args.seeds[0], ft_lr=lr) for lr in args.lr_grid}
    lr = min(first, key=lambda k: first[k]["val_error_12x"])
    for candidate, result in first.items():
        print(f"fine-tuning lr {candidate}: validation error at 12x "
              f"{result['val_error_12x']:.2f}%{'  <- chosen' if candidate == lr else ''}")
    rows = [first[lr], *(run(s, ft_lr=lr) for s in args.seeds[1:])]
    summary = {}
    for key in ("dense_error", "error_12x", "error_50x"):
        values = [r[key] for r in rows]
        summary[key] = (statistics.mean(values),
                        statistics.stdev(values) if len(values) > 1 else 0.0)
    loss_12 = summary["error_12x"][0] - summary["dense_error"][0]
    for key, (mean, std) in summary.items():
        print(f"{key}: {mean:.2f} ± {std:.2f} %")
    print(f"12x: {loss_12:+.2f} points vs dense (target <= +0.10)")
    report(args.name, "LeNet-300-100 / MNIST, iterative magnitude pruning (test error %)",
           rows, {"summary_mean_std": summary, "loss_at_12x_points": loss_12,
                  "dense_recipe": DENSE.model_dump(), "finetune_lr_chosen": lr,
                  "lr_selection_val_error_12x": {k: v["val_error_12x"] for k, v in first.items()},
                  "finetune_recipe": FINETUNE.model_dump(),
                  "args": vars(args), "data": bundle.source})


if __name__ == "__main__":
    main()
