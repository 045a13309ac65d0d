"""Top-k accuracy that counts every sample, including the last partial batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.utils import check_input, eval_mode, input_errors, iter_batches


def evaluate(
    model: nn.Module, data: Iterable, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Loss and top-k accuracy (in %) over every sample of ``data``.

    Correct predictions and losses are summed over samples and divided by the sample count once,
    so a short last batch weighs exactly its size (ShrinkBench averaged per batch instead).
    """
    correct = {k: 0 for k in topk}
    loss_sum = 0.0
    samples = 0
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"evaluate needs a torch.nn.Module, got {type(model).__name__}")
    with eval_mode(model), torch.inference_mode():
        for x, y in iter_batches(data, model):
            if y is None:
                raise InvalidValueError("evaluate needs labelled batches: (inputs, labels)")
            check_input(model, x)
            with input_errors(model, x):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
            hits = ranked == y.unsqueeze(1)
            for k in topk:
                correct[k] += int(hits[:, :k].any(dim=1).sum())
            samples += len(y)
    result = {"loss": loss_sum / samples, "samples": samples}
    for k in topk:
        result[f"top{k}"] = 100.0 * correct[k] / samples
    return result
