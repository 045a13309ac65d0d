"""Top-k accuracy and loss that count every sample (every token of a language model),
including the last partial batch; perplexity for language models."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.utils import check_input, eval_mode, input_errors, iter_batches


def predictions(outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, classes), targets (N,))`` from a model's outputs and labels.

    A classifier gives ``(batch, classes)`` for ``(batch,)`` labels; a language model gives
    ``(batch, length, vocab)`` for ``(batch, length)`` next-token targets, flattened so that
    every position is one prediction. Hugging Face outputs are read through ``.logits``.
    """
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise InvalidValueError(f"the model returned {type(outputs).__name__}, not logits")
    if logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    raise InvalidValueError(
        f"outputs of shape {tuple(logits.shape)} do not match labels of shape "
        f"{tuple(labels.shape)}: a classifier needs (batch,) labels, a language model "
        "(batch, length) next-token targets")


def is_sequence_output(outputs: Any) -> bool:
    """True for a language model's per-position logits ``(batch, length, vocab)``."""
    logits = getattr(outputs, "logits", outputs)
    return isinstance(logits, torch.Tensor) and logits.dim() == 3


def task_loss(outputs: Any, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Cross-entropy of a classifier's or a language model's outputs (per prediction: for a
    language model, nats per token). ``kwargs`` go to ``F.cross_entropy``."""
    logits, targets = predictions(outputs, labels)
    try:
        return F.cross_entropy(logits, targets, **kwargs)
    except IndexError as exc:  # checked only on failure: a check per step would cost a sync
        classes = logits.shape[-1]
        raise InvalidValueError(
            f"labels must be class indices in [0, {classes}) for a model with {classes} outputs, "
            f"got labels from {int(targets.min())} to {int(targets.max())} (a model built with "
            "too few classes? create it with num_classes=bundle.num_classes)") from exc


def evaluate(
    model: nn.Module, data: Iterable, topk: Sequence[int] = (1, 5),
    perplexity: bool | None = None,
) -> dict[str, float]:
    """Loss and top-k accuracy (in %) over every sample of ``data``.

    Correct predictions and losses are summed over samples and divided by the sample count once,
    so a short last batch weighs exactly its size (ShrinkBench averaged per batch instead).
    For a language model every position is a prediction: ``samples`` counts tokens, ``loss`` is
    nats per token, top-k is next-token accuracy and ``perplexity`` = exp(loss) is added.
    ``perplexity=True`` refuses a classifier (perplexity is a language-model metric).
    """
    correct = {k: 0 for k in topk}
    loss_sum = 0.0
    samples = 0
    sequence = False
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"evaluate needs a torch.nn.Module, got {type(model).__name__}")
    with eval_mode(model), torch.inference_mode():
        for x, y in iter_batches(data, model):
            if y is None:
                raise InvalidValueError("evaluate needs labelled batches: (inputs, labels)")
            check_input(model, x)
            with input_errors(model, x):
                outputs = model(x)
            sequence = is_sequence_output(outputs)
            if perplexity and not sequence:
                raise InvalidValueError(
                    f"perplexity is a language-model metric, but {type(model).__name__} is a "
                    "classifier (one prediction per input); use top-1 accuracy and the loss")
            logits, y = predictions(outputs, y)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
            hits = ranked == y.unsqueeze(1)
            for k in topk:
                correct[k] += int(hits[:, :k].any(dim=1).sum())
            samples += len(y)
    result = {"loss": loss_sum / samples, "samples": samples}
    for k in topk:
        result[f"top{k}"] = 100.0 * correct[k] / samples
    if sequence:
        result["perplexity"] = math.exp(min(result["loss"], MAX_LOG_PERPLEXITY))
    return result


#: exp() of a larger loss overflows a float; perplexity is reported as exp(709) at most.
MAX_LOG_PERPLEXITY = 709.0
