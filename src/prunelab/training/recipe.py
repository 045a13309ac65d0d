"""Training recipes: optimiser, learning-rate schedule, epochs, batch size."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from torch import nn

from prunelab.config import CheckedModel


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser parameter groups: trainable parameters with ``weight_decay``, except those owned
    directly by a module with ``no_weight_decay = True``, which get none.

    Learned-sparsity gates set it when their own penalty is their whole prior (L0 gates' log α,
    sparse VD's log σ²): weight decay on them would pull gates shut (or add noise) by itself,
    which the papers do not do. Pass the result to any ``torch.optim`` optimiser in a loop of
    your own: ``torch.optim.SGD(parameter_groups(model, 1e-4), lr=0.1, momentum=0.9)``.
    """
    exempt = {id(p) for m in model.modules() if getattr(m, "no_weight_decay", False)
              for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class TrainRecipe(CheckedModel):
    """How to train (or fine-tune) a model. Every field has a sensible default.

    ``milestones`` are fractions of the run at which a ``step`` schedule multiplies the learning
    rate by ``gamma`` (the Rethinking recipe: ÷10 at 50% and 75%). ``on_nonfinite`` says what a
    NaN or infinite loss does: ``stop`` training with an error naming the epoch and step (the
    default), or ``skip`` that batch (no update, BatchNorm statistics kept). ``precision="bf16"``
    runs the forward pass and loss under bfloat16 autocast (weights, gradients and optimiser
    state stay float32): about 2× faster training on CPUs with AMX or AVX512-BF16 and on GPUs.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    channels_last: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in value) or value != sorted(value):
            raise ValueError("milestones are increasing fractions of the run, each in (0, 1)")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Leave ``on_nonfinite`` and ``precision`` out at their defaults, so config hashes (the
        keys of stored results) stay what they were before the fields existed."""
        data = handler(self)
        for field, default in (("on_nonfinite", "stop"), ("precision", "fp32")):
            if data.get(field) == default:
                del data[field]
        return data

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The recipe's optimiser over ``parameter_groups(model, weight_decay)``."""
        params = parameter_groups(model, self.weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov and self.momentum > 0,
            )
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Learning-rate multiplier at optimiser step ``step`` of ``total_steps``."""
        progress = step / max(total_steps, 1)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if self.schedule == "step":
            return self.gamma ** sum(progress >= m for m in self.milestones)
        return 1.0


#: Named recipes; ``TrainRecipe(**PRESETS[name])`` or ``preset(name, epochs=...)``.
PRESETS: dict[str, dict] = {
    # Rethinking the Value of Network Pruning, CIFAR: SGD 0.9, lr 0.1, wd 1e-4, batch 64,
    # 160 epochs, lr ÷10 at 50% and 75%; fine-tuning 40 epochs at lr 1e-3.
    "rethinking-cifar": dict(epochs=160, batch_size=64, lr=0.1, weight_decay=1e-4),
    "rethinking-finetune": dict(epochs=40, batch_size=64, lr=1e-3, weight_decay=1e-4),
    # CPU-sized budgets with the same shape, for 2-core machines.
    "cpu-cifar": dict(epochs=15, batch_size=128, lr=0.1, weight_decay=1e-4, schedule="cosine"),
    "cpu-finetune": dict(epochs=3, batch_size=128, lr=0.01, weight_decay=1e-4, schedule="cosine"),
    "mnist": dict(epochs=10, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine"),
    "digits": dict(epochs=30, batch_size=64, lr=0.05, weight_decay=1e-4, schedule="cosine"),
    "digits-finetune": dict(epochs=8, batch_size=64, lr=0.01, weight_decay=1e-4, schedule="cosine"),
    # Character language models, after nanoGPT's CPU run (AdamW 1e-3, batch 12 x 64 characters,
    # 2,000 steps ~ 1.5 passes over Tiny Shakespeare): 2 epochs of 64-window batches of 16.
    "char-lm": dict(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                    schedule="cosine"),
    "char-lm-finetune": dict(epochs=1, batch_size=16, optimizer="adamw", lr=3e-4,
                             weight_decay=0.1, schedule="cosine"),
}


def preset(name: str, **overrides) -> TrainRecipe:
    """A named recipe from :data:`PRESETS` with optional field overrides."""
    from prunelab.errors import UnknownNameError

    if name not in PRESETS:
        raise UnknownNameError("recipe preset", name, PRESETS)
    return TrainRecipe(**{**PRESETS[name], **overrides})
