"""Binary masks on weights, kept exact through training.

A mask is a :mod:`torch.nn.utils.parametrize` parametrization: the module's ``weight`` becomes
``original * mask``. Because the optimiser only ever sees ``original``, and the network only ever
sees the product, a pruned weight is exactly zero after *any* optimiser step (momentum, weight
decay, Adam...), and removing the mask gives the original weights back. Masks live in the module's
state dict (``<layer>.parametrizations.weight.0.mask``), so they save and load with the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.errors import InvalidValueError, NothingToPruneError

#: Layer types whose ``weight`` is prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

MASK_KEY = ".parametrizations.weight.0.mask"


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask stored as a buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable weight tensor: the layer's qualified name and the module that owns it."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (masked, as the network sees it)."""
        return self.module.weight

    @property
    def original(self) -> torch.Tensor:
        """The trainable tensor under the mask (the weight itself when unmasked)."""
        return original_weight(self.module)

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module)

    def numel(self) -> int:
        return self.module.weight.numel()


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


def prunable_weights(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    exclude_first: bool = False,
    exclude_last: bool = False,
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
) -> list[PrunableWeight]:
    """List the weights a method may prune, in module order.

    ``include``/``exclude`` are glob patterns on layer names (``"features.*"``, ``"fc"``);
    ``exclude_first``/``exclude_last`` drop the first/last prunable layer (often the most
    sensitive). Biases and normalisation layers are never included.
    """
    found = [
        PrunableWeight(name, module)
        for name, module in model.named_modules()
        if isinstance(module, types) and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]
    if exclude_first and found:
        found = found[1:]
    if exclude_last and found:
        found = found[:-1]
    include = list(include) if include is not None else None
    exclude = list(exclude)
    check_layer_patterns([w.name for w in found], {"include": include or [], "exclude": exclude})
    if include is not None:
        found = [w for w in found if matches_any(w.name, include)]
    found = [w for w in found if not matches_any(w.name, exclude)]
    if not found:
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable layer left "
            f"(prunable types: {', '.join(t.__name__ for t in types)}); "
            "check the model and the include/exclude options"
        )
    return found


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
    """Install ``mask`` (1 = keep, 0 = pruned) on ``module.<name>``, replacing any existing one."""
    weight = getattr(module, name)
    if mask.shape != weight.shape:
        raise InvalidValueError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    mask = mask.detach().to(device=weight.device, dtype=weight.dtype)
    existing = get_mask(module, name)
    if existing is not None:
        existing.copy_(mask)
    else:
        parametrize.register_parametrization(module, name, WeightMask(mask))


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (name, module) pairs whose weight carries a mask."""
    return [(n, m) for n, m in model.named_modules() if get_mask(m) is not None]


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
    for _, module in masked_modules(model):
        _own_class(module)
        plist = module.parametrizations["weight"]
        if len(plist) == 1:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=keep_pruned)
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
    """Install empty masks on every layer the state dict has a mask for, so it can be loaded.

    ``model.load_state_dict`` alone fails on a pruned checkpoint because a fresh model has no
    parametrizations yet; :func:`prunelab.load_state_dict` calls this first.
    """
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(MASK_KEY):
            continue
        layer = key[: -len(MASK_KEY)]
        module = modules.get(layer)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # load_state_dict reports the unexpected key itself
        if get_mask(module) is None:
            set_mask(module, torch.ones_like(module.weight))


def mask_sparsity(model: nn.Module) -> float:
    """Fraction of masked-out entries over all masked weights (0.0 when nothing is masked)."""
    total = pruned = 0
    for _, module in masked_modules(model):
        mask = get_mask(module)
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


def sparsity_for_compression(model: nn.Module, compression: float, **selection) -> float:
    """The sparsity of the prunable weights that makes ``params / non-zeros == compression``.

    Compression counts every parameter (biases, normalisation, layers left dense), as ShrinkBench
    does, so a compression target asks more of the prunable weights than ``1 - 1/c``. Keyword
    arguments select the prunable layers as in :func:`prunable_weights`.
    """
    if not compression >= 1.0:
        raise InvalidValueError(f"compression must be >= 1 (params / non-zeros), got {compression}")
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(w.numel() for w in prunable_weights(model, **selection))
    fixed = total - prunable  # never pruned, always counted as non-zero
    target_nonzero = total / compression
    if target_nonzero < fixed:
        reachable = total / max(fixed, 1)
        raise InvalidValueError(
            f"compression {compression}x is out of reach: {fixed:,} parameters are not prunable, "
            f"so at most {reachable:.1f}x is possible"
        )
    return check_sparsity(1.0 - (target_nonzero - fixed) / prunable, "sparsity for compression")
