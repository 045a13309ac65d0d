"""Quality: a character-level GPT on Tiny Shakespeare, trained on CPU, then pruned one-shot.

nanoGPT's CPU reference (4 layers, 4 heads, 128 wide, context 64, batch 12, 2,000 AdamW steps at
lr 1e-3 decaying to 1e-4, no dropout) reaches a validation loss of about 1.88 nats/character on
the last 10% of the text. Here ``gpt-char`` with the same shape is trained with prunelab's loop
for about as many tokens (2 passes over the non-overlapping 64-character training windows in
batches of 12, AdamW, cosine decay to 0), and evaluated on every window of the last 10% of the
text (prunelab's test split = nanoGPT's "val"). Then, without fine-tuning, pruned one-shot to
50% (more with --sparsities) and 2:4 by each unstructured criterion (magnitude, random, Taylor,
activation, OBD, Wanda, SparseGPT), on all prunable tensors (embeddings and the output layer
included) or only the transformer blocks (what LLM pruning papers do); loss, perplexity and
pruning time of each, against one forward pass over the calibration data. The trained weights
are saved (with the zoo name) for other benchmarks to reuse.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import prunelab
from prunelab.checkpoint import save_checkpoint
from prunelab.training import Callback, TrainRecipe, train
from prunelab.utils import eval_mode, seed_everything

from common import RESULTS, report

MODEL = {"layers": 4, "width": 128, "heads": 4}
BLOCKS = ["blocks.*"]
VARIANTS = [  # (label, method, scope, include, nm)
    ("magnitude", "magnitude", "global", None, None),
    ("magnitude", "magnitude", "layer", BLOCKS, None),
    ("random", "random", "layer", BLOCKS, None),
    ("taylor", "taylor", "global", None, None),
    ("activation", "activation", "layer", BLOCKS, None),
    ("obd", "obd", "global", BLOCKS, None),
    ("wanda", "wanda", "layer", BLOCKS, None),
    ("sparsegpt", "sparsegpt", "layer", BLOCKS, None),
    # 2:4 (exactly 2 of every 4 consecutive input weights): every method, the blocks only
    ("magnitude", "magnitude", "layer", BLOCKS, "2:4"),
    ("obd", "obd", "layer", BLOCKS, "2:4"),
    ("wanda", "wanda", "layer", BLOCKS, "2:4"),
    ("sparsegpt", "sparsegpt", "layer", BLOCKS, "2:4"),
]


class _Print(Callback):
    """Prints each epoch's losses as it ends (the run is long; it may be resumed)."""

    def on_epoch_end(self, state, metrics: dict) -> None:
        print(f"epoch {metrics['epoch']}: train {metrics['train_loss']:.4f}, val "
              f"{metrics['val_loss']:.4f} ({metrics['seconds']:.0f} s)", flush=True)


def quality(model: torch.nn.Module, bundle) -> dict[str, float]:
    result = prunelab.evaluate(model, bundle.loader("test", 256), topk=(1,))
    return {"loss": result["loss"], "perplexity": result["perplexity"],
            "next_char_top1": result["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=None, help="folder with tinyshakespeare/input.txt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)  # 2 oversubscribe a shared machine
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5])
    parser.add_argument("--calibration-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", default=str(RESULTS / "gpt-char-shakespeare.pt"))
    parser.add_argument("--checkpoint", default="/tmp/prunelab-char-gpt-train.pt",
                        help="training checkpoint (per epoch): a killed run resumes from it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = prunelab.data.load("tinyshakespeare", args.data_dir, block_size=64)
    seed_everything(args.seed)
    model = prunelab.models.create("gpt-char", num_classes=bundle.num_classes,
                                   input_shape=bundle.input_shape, **MODEL)
    recipe = TrainRecipe(epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw",
                         lr=args.lr, weight_decay=0.1, schedule="cosine")
    history = train(model, bundle.loader("train", args.batch_size, shuffle=True, seed=args.seed),
                    recipe, val_data=bundle.loader("val", 256), quiet=True,
                    checkpoint=args.checkpoint, callbacks=[_Print()]).history
    seconds = sum(epoch["seconds"] for epoch in history)  # over resumed runs too
    steps = args.epochs * len(bundle.loader("train", args.batch_size))
    save_checkpoint(args.weights, model, model_name="gpt-char",
                    model_kwargs={"num_classes": bundle.num_classes,
                                  "input_shape": list(bundle.input_shape), **MODEL})
    dense = quality(model, bundle)
    rows = [{"method": "dense", "scope": "-", "layers": "-", "sparsity": 0.0,
             "calibration_seed": None, **dense}]
    forward_s = []  # one forward pass over a calibration set, for the cost of pruning
    targets = [(s, None) for s in args.sparsities] + [(0.5, "2:4")]
    for sparsity, pattern in targets:
        for label, method, scope, include, nm in VARIANTS:
            if nm != pattern:
                continue
            needs_data = prunelab.methods.METHODS.get(method).needs_data
            random_draws = method == "random"
            for seed in args.calibration_seeds if needs_data or random_draws else [None]:
                calibration = None
                if needs_data:  # 8 batches of 16 training windows, drawn by the seed
                    loader = bundle.loader("train", 16, shuffle=True, seed=seed)
                    calibration = [batch for _, batch in zip(range(8), loader, strict=False)]
                    if len(forward_s) < 3:
                        forward_s.append(_forward_seconds(model, calibration))
                options = {"seed": seed} if random_draws else {}
                if nm:
                    options["nm"] = nm
                trial = copy.deepcopy(model)
                start = time.perf_counter()
                pruned = prunelab.prune(trial, method, sparsity, scope=scope,
                                        data=calibration, include=include, **options)
                prune_seconds = time.perf_counter() - start
                rows.append({"method": label, "scope": scope,
                             "layers": "blocks" if include else "all",
                             "sparsity": nm or sparsity, "calibration_seed": seed,
                             **quality(pruned, bundle), "prune_s": round(prune_seconds, 3)})
                print(rows[-1], flush=True)
    report("char_gpt", "gpt-char (4x128) on Tiny Shakespeare: dense, then one-shot pruning "
           "without fine-tuning (test = last 10% of the text, nats/char)", rows,
           extra={"train_seconds": seconds, "train_steps": steps, "history": history,
                  "weights": os.path.relpath(args.weights, RESULTS.parent.parent), "model": MODEL,
                  "tokens_seen": steps * args.batch_size * 64,
                  "calibration_forward_s": sorted(forward_s)[len(forward_s) // 2]})


def _forward_seconds(model: torch.nn.Module, batches: list) -> float:
    """Seconds of one forward pass of ``model`` over the calibration ``batches``."""
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
