"""Sparse variational dropout on LeNet-300-100 / MNIST: compression and test error.

Molchanov et al. (2017) report 68x at 1.92% test error for LeNet-300-100 (200 epochs from random
initialisation; compression counts weights). On CPU: a short dense pre-training, then sparse-VD
training (Adam, cosine learning rate, KL weight warmed up linearly) for as many epochs as fit.
The mask is the learned one (log α > 3 pruned), not a target. Compression is reported two ways:
all parameters (params / non-zeros, biases included: prunelab's measure) and weights only (the
paper's). Epochs are not chosen on the test set (the last epoch is taken).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import prunelab
from prunelab.methods import METHODS
from prunelab.sparsity import prunable_weights
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from common import report

DENSE = TrainRecipe(epochs=10, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                    channels_last=False)
VD = TrainRecipe(epochs=20, batch_size=100, optimizer="adam", lr=1e-3, weight_decay=0.0,
                 schedule="cosine", channels_last=False)


def error(model, bundle) -> float:
    return 100.0 - prunelab.evaluate(model, bundle.loader("test", 1000), topk=(1,))["top1"]


def weight_compression(model) -> float:
    weights = [w.weight for w in prunable_weights(model)]
    return sum(w.numel() for w in weights) / max(sum(int((w != 0).sum()) for w in weights), 1)


def one_seed(seed: int, bundle, model_name: str, dense_epochs: int, vd_epochs: int,
             warmup: float, checkpoints: Path | None = None) -> dict:
    def checkpoint(stage: str) -> Path | None:
        # One file per stage; a killed run started again with the same arguments resumes at the
        # last finished epoch (the noise draws after the resume differ from an unbroken run).
        if checkpoints is None:
            return None
        return checkpoints / f"{model_name}_seed{seed}_{stage}.pt"

    seed_everything(seed)
    model = prunelab.models.create(model_name, input_shape=(1, 28, 28))
    val = bundle.loader("val", 1000)
    if dense_epochs:
        train(model, bundle.loader("train", DENSE.batch_size, shuffle=True, seed=seed),
              DENSE.model_copy(update={"epochs": dense_epochs}), val_data=val, keep_best=True,
              quiet=True, checkpoint=checkpoint(f"dense{dense_epochs}"))
    dense_error = error(model, bundle)
    method = METHODS.get("sparse-vd").create(warmup_epochs=warmup)
    result = train(model, bundle.loader("train", VD.batch_size, shuffle=True, seed=seed),
                   VD.model_copy(update={"epochs": vd_epochs}), val_data=val,
                   callbacks=method.training_callbacks(), description=f"sparse VD, seed {seed}",
                   checkpoint=checkpoint(f"vd{vd_epochs}"))
    measured = prunelab.measure(model, torch.zeros(1, 1, 28, 28))
    row = {"seed": seed, "model": model_name, "dense_epochs": dense_epochs,
           "vd_epochs": vd_epochs, "dense_error": dense_error, "vd_error": error(model, bundle),
           "compression_all_params": measured.compression,
           "compression_weights": weight_compression(model),
           "minutes": sum(h["seconds"] for h in result.history) / 60}
    print(f"seed {seed}: dense {dense_error:.2f}% -> sparse VD {row['vd_error']:.2f}% error, "
          f"{row['compression_weights']:.1f}x (weights), {row['minutes']:.1f} min", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="lenet-300-100")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=DENSE.epochs)
    parser.add_argument("--vd-epochs", type=int, default=VD.epochs)
    parser.add_argument("--warmup", type=float, default=5.0, help="KL warm-up epochs")
    parser.add_argument("--name", default=None, help="results file name")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="folder for per-epoch checkpoints; a rerun resumes from them")
    args = parser.parse_args()
    if args.checkpoints is not None:
        args.checkpoints.mkdir(parents=True, exist_ok=True)
    bundle = prunelab.data.load("mnist")
    rows = [one_seed(s, bundle, args.model, args.dense_epochs, args.vd_epochs, args.warmup,
                     args.checkpoints)
            for s in args.seeds]
    summary = {}
    for key in ("dense_error", "vd_error", "compression_all_params", "compression_weights"):
        values = [r[key] for r in rows]
        summary[key] = (statistics.mean(values),
                        statistics.stdev(values) if len(values) > 1 else 0.0)
        print(f"{key}: {summary[key][0]:.2f} ± {summary[key][1]:.2f}")
    name = args.name or f"sparse_vd_{args.model.replace('-', '_')}"
    report(name, f"Sparse VD on {args.model} / MNIST", rows,
           {"summary_mean_std": summary, "vd_recipe": VD.model_dump(),
            "dense_recipe": DENSE.model_dump(), "args": vars(args), "data": bundle.source})


if __name__ == "__main__":
    main()
