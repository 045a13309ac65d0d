"""Shared parts of learned-sparsity methods: gates installed as parametrizations during training,
baked into ordinary prunelab masks at the end.

A learned method adds a parametrization ``w -> f(w, own parameters)`` to every Linear/Conv weight
in :meth:`~prunelab.training.Callback.on_setup` (before the optimiser exists, so the optimiser
trains the new parameters). When training ends the parametrization's deterministic (eval-mode)
value replaces the weight, its zeros become a mask, and the parametrization goes: the model is a
plain masked model again, which ``measure``, sweeps and reports understand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.errors import InvalidValueError
from prunelab.methods.base import UnstructuredMethod
from prunelab.sparsity import PrunableWeight, prunable_weights
from prunelab.sparsity.masks import _own_class, get_mask, original_weight, set_mask
from prunelab.training import Callback, TrainState

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_positive(value: float, what: str, *, strict: bool = False) -> float:
    """``value`` must be finite and >= 0 (> 0 with ``strict``); one readable line otherwise."""
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        bound = "> 0" if strict else ">= 0"
        raise InvalidValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return value


def dataset_size(state: TrainState) -> int:
    """Training examples per epoch (steps × batch size): the N of an ELBO divided by N."""
    return state.steps_per_epoch * state.recipe.batch_size


class LearnedWeight(nn.Module):
    """A parametrization whose eval-mode value is the final (sparse) weight.

    ``no_weight_decay``: the optimiser's weight decay leaves this gate's own parameters alone
    (see :func:`prunelab.training.parameter_groups`); set where the method's penalty is their
    prior, keep False where the method relies on weight decay (STR's thresholds)."""

    no_weight_decay: bool = False

    def install(self, module: nn.Module, param: str) -> None:
        """Called after registration (e.g. to add forward hooks)."""

    def uninstall(self, module: nn.Module) -> None:
        """Called before removal."""


def gated_layers(model: nn.Module) -> list[PrunableWeight]:
    """The Linear/Conv weights learned methods act on (the only prunable types they take)."""
    return [w for w in prunable_weights(model) if isinstance(w.module, LAYER_TYPES)
            and w.param == "weight"]


def learned(module: nn.Module, param: str = "weight") -> LearnedWeight | None:
    """The learned parametrization on ``module.<param>``, if any."""
    if not parametrize.is_parametrized(module, param):
        return None
    return next((p for p in module.parametrizations[param] if isinstance(p, LearnedWeight)), None)


def install(module: nn.Module, gate: LearnedWeight, param: str = "weight") -> None:
    """Add ``gate`` on ``module.<param>`` (after any mask, so pruned weights stay zero)."""
    if learned(module, param) is not None:
        raise InvalidValueError(
            f"{type(module).__name__} already carries a learned gate: one learned method at a time")
    weight = original_weight(module, param)
    gate.to(device=weight.device)
    parametrize.register_parametrization(module, param, gate, unsafe=True)
    gate.install(module, param)


def bake(model: nn.Module) -> nn.Module:
    """Replace every learned parametrization by its eval-mode weight and a mask of its zeros."""
    for _, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for param in list(module.parametrizations):
            gate = learned(module, param)
            if gate is None:
                continue
            was_training = gate.training
            gate.eval()
            with torch.no_grad():
                final = getattr(module, param).detach().clone()
            gate.train(was_training)
            gate.uninstall(module)
            old = get_mask(module, param)
            plist = module.parametrizations[param]
            _own_class(module)
            if len(plist) == 1:
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)
            else:
                del plist[next(i for i, p in enumerate(plist) if p is gate)]
            with torch.no_grad():
                original_weight(module, param).copy_(final)
            keep = final != 0
            set_mask(module, keep if old is None else keep & (old != 0), param)
    return model


class GateCallback(Callback):
    """Installs a gate on every Linear/Conv weight before training and bakes it at the end."""

    def make_gate(self, weight: PrunableWeight) -> LearnedWeight:
        raise NotImplementedError

    def on_setup(self, model: nn.Module) -> None:
        for weight in gated_layers(model):
            install(weight.module, self.make_gate(weight))

    def gates(self, model: nn.Module) -> list[LearnedWeight]:
        return [g for m in model.modules() if (g := learned(m)) is not None]

    def on_train_end(self, state: TrainState) -> None:
        bake(state.model)


@dataclass
class LearnedMaskMethod(UnstructuredMethod):
    """A method whose training leaves masks; pruning keeps them and, if the learned sparsity is
    below the target, removes the smallest remaining weights to reach it (already masked weights
    score −∞ and stay pruned, so a target below the learned sparsity changes nothing)."""

    def scores(self, model: nn.Module, weights: list[PrunableWeight],
               data: Iterable | None) -> list[torch.Tensor]:
        if any(learned(w.module, w.param) is not None for w in weights):
            bake(model)  # pruned straight after training inside a user's loop
        return [w.weight.detach().abs() for w in weights]
