"""Which parameters are prunable: a registry per module type, and the list a method prunes.

By default the prunable parameters are the weight matrices and kernels that multiply a layer's
input: ``weight`` of Linear, Conv and ConvTranspose layers, of Embedding and EmbeddingBag, the fused
``in_proj_weight`` of :class:`torch.nn.MultiheadAttention` (or its ``q/k/v_proj_weight`` when the
projections are separate; ``out_proj`` is a Linear), and every ``weight_ih_l*``/``weight_hh_l*``
(and ``weight_hr_l*``) of RNN/LSTM/GRU layers. Biases and normalisation are never prunable. A custom
module declares its own with :func:`register_prunable`.

A prunable tensor's *name* is the module's qualified name for a ``weight`` (``"features.0"``,
``"fc"``) and ``"<module>.<parameter>"`` otherwise (``"attn.in_proj_weight"``,
``"lstm.weight_hh_l0"``); include/exclude and ``layer_sparsity`` patterns match these names.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from prunelab.errors import InvalidValueError, NothingToPruneError
from prunelab.sparsity.masks import (
    check_layer_patterns,
    check_sparsity,
    get_mask,
    masked_parameters,
    matches_any,
    original_weight,
    set_mask,
)
from prunelab.utils import eval_mode

ParamSpec = Sequence[str] | Callable[[nn.Module], Iterable[str]]

_PRUNABLE: dict[type[nn.Module], ParamSpec] = {}


def register_prunable(module_type: type[nn.Module], params: ParamSpec) -> None:
    """Declare which parameters of ``module_type`` (and its subclasses) methods may prune.

    ``params`` is a list of parameter names, or a function ``module -> names`` for parameters that
    depend on how the module was built. Registering a type again replaces its entry; an empty list
    makes a type unprunable. The most specific registered class of a module decides.

    >>> register_prunable(MyGatedLinear, ["weight", "gate_weight"])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise InvalidValueError(f"register_prunable needs an nn.Module class, got {module_type!r}")
    if isinstance(params, str) or not (callable(params) or isinstance(params, Sequence)):
        raise InvalidValueError(
            f"register_prunable({module_type.__name__}, ...) needs a list of parameter names or a "
            f"function module -> names, got {params!r}")
    _PRUNABLE[module_type] = params if callable(params) else tuple(params)


def _attention_params(module: nn.MultiheadAttention) -> list[str]:
    if module.in_proj_weight is not None:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _rnn_params(module: nn.RNNBase) -> list[str]:
    return [name for name in module._flat_weights_names if name.startswith("weight_")]


for _type in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
              nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag):
    register_prunable(_type, ["weight"])
register_prunable(nn.MultiheadAttention, _attention_params)
register_prunable(nn.RNNBase, _rnn_params)


def _register_integrations() -> None:
    """Register optional libraries' layer types once the library is imported (Hugging Face
    ``transformers``: GPT-2's Conv1D), so their models prune without a setup call."""
    if "transformers.pytorch_utils" in sys.modules:
        from prunelab import hf

        hf.register()


def prunable_parameter_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own prunable parameters (``[]`` for an unregistered type)."""
    _register_integrations()
    spec = next((_PRUNABLE[c] for c in type(module).__mro__ if c in _PRUNABLE), ())
    names = list(spec(module) if callable(spec) else spec)
    for name in names:
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            raise InvalidValueError(
                f"{type(module).__name__} is registered with prunable parameter {name!r}, but it "
                "has no such tensor; fix the register_prunable entry")
        if isinstance(original_weight(module, name), UninitializedParameter):
            raise InvalidValueError(
                f"{type(module).__name__}.{name} is not initialised yet (a lazy module): run one "
                "forward pass before pruning")
    return names


def prunable_name(module_name: str, param: str) -> str:
    """The name of a prunable tensor: the module's for ``weight``, ``module.param`` otherwise."""
    if param == "weight":
        return module_name
    return f"{module_name}.{param}" if module_name else param


Holder = tuple[str, nn.Module, str]  # (module name, module, parameter name)


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable tensor: its name, the module that owns it and the parameter's name there.

    A tensor shared by several modules (tied weights, e.g. a token embedding and the output layer)
    is listed once; ``shared`` names the other holders, and a mask goes on every holder so no
    forward sees the unpruned tensor.
    """

    name: str
    module: nn.Module
    param: str = "weight"
    shared: tuple[Holder, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        """The effective tensor (masked, as the network sees it)."""
        return getattr(self.module, self.param)

    @property
    def original(self) -> torch.Tensor:
        """The trainable tensor under the mask (the tensor itself when unmasked)."""
        return original_weight(self.module, self.param)

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module, self.param)

    @property
    def holders(self) -> tuple[Holder, ...]:
        """Every (module name, module, parameter name) that holds this tensor, owner first."""
        owner = self.name if self.param == "weight" else self.name.removesuffix(self.param)
        return ((owner.removesuffix("."), self.module, self.param), *self.shared)

    @property
    def names(self) -> tuple[str, ...]:
        """This tensor's name under each holder (patterns match any of them)."""
        return tuple(prunable_name(n, p) for n, _, p in self.holders)

    def matches(self, patterns: Iterable[str]) -> bool:
        """Whether one of the tensor's names matches one of the glob ``patterns``."""
        patterns = list(patterns)
        return any(matches_any(name, patterns) for name in self.names)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Install ``mask`` (1 = keep) on every holder of the tensor."""
        for _, module, param in self.holders:
            set_mask(module, mask, param)

    def numel(self) -> int:
        return self.original.numel()


def _holders(model: nn.Module) -> list[Holder]:
    return [(name, module, param) for name, module in model.named_modules()
            for param in prunable_parameter_names(module)]


def prunable_weights(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    exclude_first: bool = False,
    exclude_last: bool = False,
) -> list[PrunableWeight]:
    """List the tensors a method may prune, in module order, each shared tensor once.

    ``include``/``exclude`` are glob patterns on names (``"features.*"``, ``"fc"``,
    ``"*.in_proj_weight"``); a shared tensor is excluded when any of its names matches.
    ``exclude_first``/``exclude_last`` drop the tensor of the first/last prunable layer (often
    the most sensitive). Biases and normalisation layers are never included.
    """
    holders = _holders(model)
    by_tensor: dict[int, list[Holder]] = {}
    for holder in holders:
        by_tensor.setdefault(id(original_weight(holder[1], holder[2])), []).append(holder)
    found = []
    for (module_name, module, param), *shared in by_tensor.values():
        name = prunable_name(module_name, param)
        found.append(PrunableWeight(name, module, param, tuple(shared)))
    dropped = set()
    if exclude_first and holders:
        dropped.add(id(original_weight(holders[0][1], holders[0][2])))
    if exclude_last and holders:
        dropped.add(id(original_weight(holders[-1][1], holders[-1][2])))
    found = [w for w in found if id(w.original) not in dropped]
    include = list(include) if include is not None else None
    exclude = list(exclude)
    names = [name for w in found for name in w.names]
    check_layer_patterns(names, {"include": include or [], "exclude": exclude})
    if include is not None:
        found = [w for w in found if w.matches(include)]
    found = [w for w in found if not w.matches(exclude)]
    if not found:
        types = sorted({t.__name__ for t in _PRUNABLE if _PRUNABLE[t]})
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable layer left (prunable types: "
            f"{', '.join(types)}, and types added with prunelab.sparsity.register_prunable); "
            "check the model and the include/exclude options"
        )
    return found


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


def collapsed_layers(model: nn.Module) -> list[str]:
    """Names of the masked tensors with no weight left (layer collapse)."""
    return [prunable_name(name, param) for name, module, param in masked_parameters(model)
            if not bool(get_mask(module, param).any())]


def signal_passes(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the output still depends on the input: a collapsed layer on every path from the
    input to the output cuts it (a collapsed 1x1 shortcut of a residual block does not, the
    block's other branch still carries the signal).

    Two inputs are compared in eval mode: ``example`` and a random one of its shape (token ids:
    the ids shifted by one, within the range seen). Identical outputs mean the network is cut.
    """
    if example.is_floating_point():
        generator = torch.Generator(device=example.device).manual_seed(0)
        other = torch.randn(example.shape, generator=generator, device=example.device,
                            dtype=example.dtype)
    else:
        other = (example + 1) % (int(example.max()) + 1)
        if torch.equal(other, example):  # one id only: no second input to compare
            return not collapsed_layers(model)
    with torch.no_grad(), eval_mode(model):
        first, second = model(example), model(other)
    if not isinstance(first, torch.Tensor):  # a model returning a structure: compare its logits
        first, second = first[0], second[0]
    return not torch.equal(first, second)


def check_not_cut(model: nn.Module, example: torch.Tensor, what: str) -> None:
    """Refuse a pruned model whose collapsed layers cut the network (naming the first); warn
    when layers collapsed but the signal still passes (through a residual branch)."""
    collapsed = collapsed_layers(model)
    if not collapsed:
        return
    which = (f"every weight of layer {collapsed[0]!r}"
             f"{f' (and {len(collapsed) - 1} more)' if len(collapsed) > 1 else ''}")
    if not signal_passes(model, example):
        raise InvalidValueError(
            f"{what} prunes {which}, which cuts the network; lower the target, use a per-layer "
            "scope (layer, erk) or exclude the layer")
    warnings.warn(f"{what} prunes {which}; the signal still passes through the network's "
                  "other paths (a residual branch)", stacklevel=3)
