"""Hugging Face ``transformers`` causal language models (GPT-2, OPT, Llama, ...), optional.

``prunelab.prune(model, ...)`` works on them as on any module: their ``nn.Linear`` projections
and embeddings are prunable as they are; GPT-2's transposed ``Conv1D`` layers (weight ``(in,
out)``) are registered here, with the input observer that ``activation`` needs. Registration
happens by itself as soon as ``transformers`` has been imported (the prunable registry calls
:func:`register` when it sees ``transformers`` loaded), so nothing has to be called first.
Calibration batches are ``(input_ids, next-token targets)``; outputs are read through
``.logits``, so ``evaluate`` reports loss per token and perplexity, and ``measure`` MACs per
token.

The usual practice (SparseGPT, Wanda) prunes the decoder blocks' linear layers only, leaving the
embeddings and the output layer dense: :func:`block_patterns` gives the ``include`` pattern.

Install with ``pip install prunelab[hf]``.
"""

from __future__ import annotations

from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.utils import missing_packages

_REGISTERED = False


def available() -> bool:
    """Whether ``transformers`` is installed (without importing it: the import takes seconds)."""
    return not missing_packages("transformers")


def register() -> None:
    """Register ``transformers``' own layer types with prunelab (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.pytorch_utils import Conv1D

    from prunelab.methods.calibration import features_observer, register_input_observer
    from prunelab.sparsity import register_prunable

    register_prunable(Conv1D, ["weight"])
    # Conv1D computes x @ weight + bias: row i of the weight multiplies input feature i.
    register_input_observer(Conv1D, lambda module, param: features_observer(module, param, 0))
    _REGISTERED = True


def block_patterns(model: nn.Module) -> list[str]:
    """The ``include`` pattern of a transformer's repeated blocks: the longest ``ModuleList``
    (``transformer.h.*`` for GPT-2, ``model.decoder.layers.*`` for OPT, ``model.layers.*`` for
    Llama), i.e. every layer but the embeddings and the output layer."""
    lists = [(len(module), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name]
    if not lists:
        raise InvalidValueError(
            f"{type(model).__name__} has no list of blocks (nn.ModuleList); give include "
            "patterns yourself")
    return [f"{max(lists)[1]}.*"]
