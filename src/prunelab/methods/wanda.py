"""Wanda (Sun et al. 2024): |w_ij| · ‖x_j‖ compared within each output row, no weight update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunelab.methods.activation import ActivationPruning
from prunelab.methods.base import register_method


@register_method("wanda")
@dataclass
class WandaPruning(ActivationPruning):
    """Wanda: score |w_ij|·‖x_j‖ and prune the same fraction of every output row (Sun et al. 2024).

    The score is the activation criterion's (the weight's magnitude times the norm of the input
    it multiplies, over the calibration data; see ``activation``), but weights only compete with
    the other weights of their output unit: each row of each layer (a Linear's output feature, a
    convolution's filter) loses exactly ``round(sparsity · row length)`` weights. That is what
    makes Wanda work on language models, whose input features differ in scale by orders of
    magnitude, without any weight update or retraining. Because the comparison is per row,
    ``scope`` has no effect (every layer gets the target sparsity); per-layer ``layer_sparsity``
    overrides still apply. With ``nm`` the comparison is within each N:M group instead.
    """

    rowwise: ClassVar[bool] = True
