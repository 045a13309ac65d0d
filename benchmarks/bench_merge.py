"""Neuron merging vs plain removal: LeNet-300-100 / MNIST, 30% of the hidden neurons removed.

A dense LeNet-300-100 is trained; then 30% of each hidden layer's neurons (90 of 300, 30 of 100)
are removed four ways, with no fine-tuning: ``merge`` (neurons best explained by a constant or by
a surviving neuron, folded into the next layer), the same neurons removed without folding
(``merge, compensate=False``: what the folding is worth), the smallest-norm filters
(``l2-channel``) and random neurons. Test error right after removal and after one epoch of
fine-tuning. Calibration: 20 training batches of 128.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import prunelab
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from common import report

DENSE = TrainRecipe(epochs=10, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                    channels_last=False)
FINETUNE = TrainRecipe(epochs=1, batch_size=128, lr=0.01, weight_decay=1e-4, schedule="cosine",
                       channels_last=False)
VARIANTS = {
    "merge": ("merge", {}),
    "same neurons, no folding": ("merge", {"compensate": False}),
    "l2-channel": ("l2-channel", {"round_to": 1}),  # exact counts, as merge removes
    "random": ("random-channel", {"round_to": 1}),
}


def error(model, bundle) -> float:
    return 100.0 - prunelab.evaluate(model, bundle.loader("test", 1000), topk=(1,))["top1"]


def one_seed(seed: int, bundle, dense_epochs: int, ratio: float) -> list[dict]:
    seed_everything(seed)
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    batches = bundle.loader("train", DENSE.batch_size, shuffle=True, seed=seed)
    val = bundle.loader("val", 1000)
    train(model, batches, DENSE.model_copy(update={"epochs": dense_epochs}), val_data=val,
          keep_best=True, quiet=True)
    dense_error = error(model, bundle)
    calibration = bundle.loader("train", 128, shuffle=True, seed=seed + 1000)
    rows = []
    for label, (method, options) in VARIANTS.items():
        pruned = copy.deepcopy(model)
        if method == "random-channel":
            options = {**options, "seed": seed}
        prunelab.prune(pruned, method, ratio, scope="layer", data=calibration, **options)
        hidden = pruned[1].out_features + pruned[3].out_features
        after = error(pruned, bundle)
        train(pruned, batches, FINETUNE, quiet=True)
        rows.append({"seed": seed, "variant": label, "hidden_neurons": hidden,
                     "dense_error": dense_error, "error_no_finetune": after,
                     "error_1_epoch": error(pruned, bundle)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=DENSE.epochs)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bundle = prunelab.data.load("mnist")
    rows = [r for s in args.seeds for r in one_seed(s, bundle, args.dense_epochs, args.ratio)]
    summary = {}
    for label in VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        summary[label] = {
            key: (statistics.mean(r[key] for r in mine),
                  statistics.stdev(r[key] for r in mine) if len(mine) > 1 else 0.0)
            for key in ("error_no_finetune", "error_1_epoch")}
        print(label, {k: f"{m:.2f} ± {s:.2f}" for k, (m, s) in summary[label].items()})
    report("merge_lenet300", "LeNet-300-100 / MNIST: 30% of hidden neurons removed (test error %)",
           rows, {"summary_mean_std": summary, "dense_recipe": DENSE.model_dump(),
                  "finetune_recipe": FINETUNE.model_dump(), "args": vars(args),
                  "data": bundle.source})


if __name__ == "__main__":
    main()
