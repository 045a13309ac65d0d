"""Binary masks on weights, kept exact through training.

A mask is a :mod:`torch.nn.utils.parametrize` parametrization: a module's parameter (``weight``,
``in_proj_weight``, ``weight_hh_l0``...) becomes ``original * mask``. Because the optimiser only
ever sees ``original``, and the network only ever sees the product, a pruned weight is exactly zero
after *any* optimiser step (momentum, weight decay, Adam...), and removing the mask gives the
original weights back. Masks live in the module's
state dict (``<layer>.parametrizations.<parameter>.0.mask``), so they save and load with the model.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.errors import InvalidValueError

#: A mask's state-dict key: ``<module>.parametrizations.<parameter>.<index>.mask``.
MASK_KEY = re.compile(r"^(?:(?P<module>.*)\.)?parametrizations\.(?P<param>[^.]+)\.\d+\.mask$")


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask stored as a buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def layer_type_name(module: nn.Module) -> str:
    """Class name without the ``Parametrized`` prefix that parametrize adds."""
    name = type(module).__name__
    return name.removeprefix("Parametrized")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether layer ``name`` matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_layer_patterns(layers: list[str], patterns: dict[str, Iterable[str]]) -> None:
    """Every glob in ``patterns`` (option name -> patterns) must match one of ``layers``: a
    typo, or a preset made for another model, would otherwise prune something else than asked."""
    for option, given in patterns.items():
        for pattern in given:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
                shown = ", ".join(layers[:12]) + (", ..." if len(layers) > 12 else "")
                raise InvalidValueError(
                    f"{option} pattern {pattern!r} matches no prunable layer of this model (a "
                    f"typo, or a preset for another model?); its prunable layers: "
                    f"{shown or 'none'}")


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask on ``module.<name>``, or None when it is not masked."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p.mask
    return None


def original_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The trainable tensor under any parametrization of ``module.<name>``."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Install ``mask`` (1 = keep, 0 = pruned) on ``module.<name>``, replacing any existing one.

    This masks one holder; a tensor shared by several modules is masked everywhere through
    :meth:`prunelab.sparsity.PrunableWeight.set_mask`, which the methods use.
    """
    weight = getattr(module, name)
    if mask.shape != weight.shape:
        raise InvalidValueError(
            f"mask shape {tuple(mask.shape)} does not match the shape {tuple(weight.shape)} of "
            f"{type(module).__name__}.{name}"
        )
    mask = mask.detach().to(device=weight.device, dtype=weight.dtype)
    existing = get_mask(module, name)
    if existing is not None:
        existing.copy_(mask)
    else:
        parametrize.register_parametrization(module, name, WeightMask(mask))
        if isinstance(module, nn.RNNBase):
            _copyable_rnn(type(module))


def _copyable_rnn(cls: type[nn.Module]) -> None:
    """Let a masked RNN be deep-copied after a forward pass.

    An RNN keeps the tensors its last forward used in ``_flat_weights``; for a masked weight that
    is ``original * mask`` with its autograd history, which ``copy.deepcopy`` refuses. The copy
    first refreshes them without history (the next forward refreshes them again anyway).
    """
    if getattr(cls, "_copies_flat_weights", False):
        return
    copy_module = cls.__deepcopy__

    def deepcopy(self: nn.RNNBase, memo: dict) -> nn.RNNBase:
        with torch.no_grad():
            self._init_flat_weights()
        return copy_module(self, memo)

    cls.__deepcopy__ = deepcopy
    cls._copies_flat_weights = True


def masked_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every masked parameter, in module order."""
    return [(name, module, param) for name, module in model.named_modules()
            if parametrize.is_parametrized(module)
            for param in module.parametrizations if get_mask(module, param) is not None]


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (name, module) pairs with at least one masked parameter."""
    seen: dict[str, nn.Module] = {}
    for name, module, _ in masked_parameters(model):
        seen.setdefault(name, module)
    return list(seen.items())


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    ``copy.deepcopy`` shares parametrize's generated ``Parametrized<Layer>`` class between the
    original and the copy, and removing a parametrization deletes the property from that class,
    which would break the other model. A private class makes removal local to this module.
    """
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _strip_masks(model: nn.Module, keep_pruned: bool) -> nn.Module:
    owned: set[int] = set()
    for _, module, param in masked_parameters(model):
        if id(module) not in owned:
            _own_class(module)
            owned.add(id(module))
        plist = module.parametrizations[param]
        if len(plist) == 1:
            parametrize.remove_parametrizations(module, param, leave_parametrized=keep_pruned)
            continue
        # Another parametrization shares the weight: fold the mask into the original instead.
        index = next(i for i, p in enumerate(plist) if isinstance(p, WeightMask))
        with torch.no_grad():
            if keep_pruned:
                plist.original.mul_(plist[index].mask)
        del plist[index]
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake masks into the weights and remove them: a plain model with zeros, no hooks left."""
    return _strip_masks(model, keep_pruned=True)


def remove_masks(model: nn.Module) -> nn.Module:
    """Remove masks and give back the original weights under them (undo pruning)."""
    return _strip_masks(model, keep_pruned=False)


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Install empty masks on every parameter the state dict has a mask for, so it can be loaded.

    ``model.load_state_dict`` alone fails on a pruned checkpoint because a fresh model has no
    parametrizations yet; :func:`prunelab.load_state_dict` calls this first.
    """
    modules = dict(model.named_modules())
    for key in state_dict:
        found = MASK_KEY.match(key)
        if found is None:
            continue
        module = modules.get(found["module"] or "")
        param = found["param"]
        if module is None or not isinstance(getattr(module, param, None), torch.Tensor):
            continue  # load_state_dict reports the unexpected key itself
        if get_mask(module, param) is None:
            set_mask(module, torch.ones_like(getattr(module, param)), param)


def mask_sparsity(model: nn.Module) -> float:
    """Fraction of masked-out entries over all masked tensors (0.0 when nothing is masked); a
    tensor shared by several modules counts once."""
    total = pruned = 0
    seen: set[int] = set()
    for _, module, param in masked_parameters(model):
        if id(original_weight(module, param)) in seen:
            continue
        seen.add(id(original_weight(module, param)))
        mask = get_mask(module, param)
        total += mask.numel()
        pruned += int((mask == 0).sum())
    return pruned / total if total else 0.0


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Validate a target sparsity in [0, 1)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise InvalidValueError(
            f"{what} must be in [0, 1) (the fraction of weights removed), got {value}; "
            "for a compression ratio c use sparsity = 1 - 1/c"
        )
    return value
