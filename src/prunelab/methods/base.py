"""The method contract and registry.

A pruning method is one small dataclass in one file, registered by name with
:func:`register_method`. Its dataclass fields are its options (with defaults; the bounded types
below, such as ``Count`` or ``Fraction``, state their ranges), its docstring is its
documentation: ``prunelab methods``, the benchmark and the docs all read them from here. The
class variables ``targets`` and ``scopes`` say what it can be asked for, so a sweep refuses a
request no run could serve before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import numpy as np
import pydantic
import torch
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.registry import Registry
from prunelab.sparsity import (
    PrunableWeight,
    check_sparsity,
    keep_mask_from_scores,
    prunable_weights,
    sparsity_for_compression,
)
from prunelab.sparsity.distributions import DISTRIBUTIONS, layer_keep_counts
from prunelab.sparsity.nm import input_dim, nm_keep_mask, output_dim, parse_nm, row_keep_mask
from prunelab.targets import check_target, solve_ratio

METHODS: Registry[type[Method]] = Registry("method")
#: Option types with bounds, checked whenever a method is built, before anything trains or prunes.
Count = Annotated[int, pydantic.Field(ge=1)]
NonNegative = Annotated[float, pydantic.Field(ge=0)]
Positive = Annotated[float, pydantic.Field(gt=0)]
Fraction = Annotated[float, pydantic.Field(gt=0, lt=1)]
Width = Annotated[float, pydantic.Field(gt=0, le=1)]
Momentum = Annotated[float, pydantic.Field(ge=0, lt=1)]
Sandwich = Annotated[int, pydantic.Field(ge=2)]  # widths per step: at least the max and min
#: ``global``: one threshold over all layers; ``layer``: the same sparsity in every layer;
#: ``er``/``erk``: per-layer sparsities from the Erdős–Rényi(-Kernel) distribution.
SCOPES = ("global", "layer", "er", "erk")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator that registers a method under ``name`` (e.g. ``"magnitude"``)."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return add


@dataclass(frozen=True)
class LayerSelection:
    """Which layers a method may touch, and per-layer sparsity overrides (glob patterns)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_last: bool = False
    layer_sparsity: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def weights(self, model: nn.Module) -> list[PrunableWeight]:
        return prunable_weights(
            model,
            include=self.include,
            exclude=self.exclude,
            exclude_first=self.exclude_first,
            exclude_last=self.exclude_last,
        )


ALL_LAYERS = LayerSelection()


@dataclass
class Method:
    """Base class of all pruning methods."""

    name: ClassVar[str] = ""
    granularity: ClassVar[str] = "unstructured"
    needs_data: ClassVar[bool] = False
    #: How the method decides what goes, when the class alone does not say it (the docs'
    #: *how* axis: scores, a solver, learned during training).
    decides: ClassVar[str] = ""
    #: The target kinds and scopes ``prune`` serves (see :meth:`check_request`).
    targets: ClassVar[tuple[str, ...]] = ("sparsity", "compression", "speedup")
    scopes: ClassVar[tuple[str, ...]] = SCOPES

    @classmethod
    def create(cls, **options: Any) -> Method:
        """Instantiate with ``options``; unknown option names raise a readable error."""
        valid = set(cls.option_names())
        unknown = sorted(set(options) - valid)
        if unknown:
            allowed = ", ".join(sorted(valid)) or "none"
            raise InvalidValueError(
                f"method {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {allowed}"
            )
        return cls(**options)

    def __setattr__(self, name: str, value: Any) -> None:
        """Options are checked against their annotated types, bounds included, whenever they
        are set (by the constructor, ``create``, a config or later assignment), and kept as the
        validated value (``"3"`` becomes ``3``): no way of building a method skips the rules."""
        option = _option_adapters(type(self)).get(name)
        if option is not None:
            value = self._checked(name, value, *option)
        object.__setattr__(self, name, value)

    def _checked(self, name: str, value: Any, hint: Any, adapter: pydantic.TypeAdapter) -> Any:
        what = f"method {self.name or type(self).__name__!r} option {name!r}"
        if not _finite(value):
            raise InvalidValueError(f"{what} must be a finite number, got {value!r}")
        try:  # strictly when a bool is given: True is not the number 1
            checked = adapter.validate_python(value, strict=_has_bool(value))
        except pydantic.ValidationError:
            raise InvalidValueError(f"{what} must be {_type_name(hint)}, got {value!r}") from None
        if name == "nm" and checked is not None:
            parse_nm(checked)
        return checked

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def option_names(cls) -> list[str]:
        """The options a user may set (dataclass fields, less internal ``init=False`` ones)."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default value (options without a default are left out)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.init and f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.init and f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        return values

    @classmethod
    def option_table(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) for each option."""
        hints = {name: hint for name, (hint, _) in _option_adapters(cls).items()}
        rows = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f.name, _type_name(hints[f.name]), default))
        return rows

    def check_request(self, target: str, value: float, scope: str = "global") -> None:
        """Refuse a target (kind and value) or scope this method cannot serve; sweeps call it
        for every grid entry before anything trains, ``prune`` before it prunes."""
        check_target(target, value)
        if target not in self.targets:
            raise InvalidValueError(f"method {self.name!r} takes a target of "
                                    f"{_either(self.targets)}, not {target!r}")
        if target == "sparsity":
            check_sparsity(value)
        if scope not in self.scopes:
            raise InvalidValueError(f"method {self.name!r} takes scope {_either(self.scopes)}, "
                                    f"not {scope!r}")
        if getattr(self, "nm", None) is not None:  # the methods with an N:M option
            check_nm(self.nm, value, target, ALL_LAYERS)

    def check_experiment(self, calibration_batches: int) -> None:
        """Refuse experiment settings this method cannot run with (an experiment's or sweep's
        plan calls it before anything trains; ``calibration_batches`` is the number of batches
        ``prune`` will get as ``data``). Default: any."""

    def training_model(self, model: nn.Module, example: torch.Tensor | None = None
                       ) -> nn.Module:
        """The module trained before pruning (with :meth:`training_callbacks`): the model
        itself, or for a slimmable method a supernet built from it. Default: the model."""
        return model

    def training_callbacks(self) -> list:
        """Callbacks for training the model *before* pruning (e.g. sparsity on BN scales).

        Methods such as Network Slimming prune a model trained with their regulariser; the
        experiment runner trains such a model for them. Default: none.
        """
        return []

    def prune(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        scope: str = "global",
        data: Iterable | None = None,
        selection: LayerSelection = ALL_LAYERS,
        target: str = "sparsity",
        example_input: torch.Tensor | None = None,
    ) -> nn.Module:
        """Prune ``model`` in place. ``sparsity`` is the target value: a sparsity, or with
        ``target="compression"`` / ``"speedup"`` a parameter / FLOPs reduction factor."""
        raise NotImplementedError

    def _requested_sparsity(self, model: nn.Module, value: float, target: str, scope: str,
                            data: Iterable | None, selection: LayerSelection,
                            example_input: torch.Tensor | None) -> float:
        """The sparsity a weight-level ``prune`` call asks for (a compression or speed-up target
        solved for), after refusing a request it cannot serve or missing calibration data."""
        self.check_request(target, value, scope)
        if target != "sparsity":
            value = self._sparsity_for(model, target, value, scope, data, selection,
                                       example_input)
        value = check_sparsity(value)
        if self.needs_data and data is None:
            raise PrunelabError(
                f"method {self.name!r} needs calibration data: pass data=<iterable of batches>")
        return value

    def _sparsity_for(self, model: nn.Module, target: str, value: float, scope: str,
                      data: Iterable | None, selection: LayerSelection,
                      example_input: torch.Tensor | None) -> float:
        """The sparsity that reaches a compression or a FLOPs speed-up.

        Compression has a closed form unless per-layer overrides fix some layers' sparsity;
        then, like a speed-up, it is searched by pruning copies and measuring them.
        """
        check_target(target, value)
        if target == "compression" and not selection.layer_sparsity:
            return sparsity_for_compression(
                model, value, include=selection.include, exclude=selection.exclude,
                exclude_first=selection.exclude_first, exclude_last=selection.exclude_last)
        from prunelab.metrics import count_parameters, measure
        from prunelab.structured.graph import as_example

        if target == "speedup":
            example = as_example(model, example_input, data)

        def achieved(ratio: float) -> float:
            trial = self.prune(copy.deepcopy(model), ratio, scope=scope, data=data,
                               selection=selection)
            if target == "speedup":
                return measure(trial, example).theoretical_speedup
            total, nonzero = count_parameters(trial)
            return total / max(nonzero, 1)

        return solve_ratio(achieved, value, target)


@dataclass
class UnstructuredMethod(Method):
    """A method that scores single weights; the lowest scores are masked to zero.

    Every unstructured method takes the ``nm`` option (``"2:4"``, ``"4:8"``...): instead of one
    threshold per scope, each group of M consecutive input weights keeps its N best-scored
    entries (:mod:`prunelab.sparsity.nm` says which entries are consecutive), so the sparsity
    is 1 − N/M in every layer. A subclass with ``rowwise = True`` (Wanda) compares scores only
    within each output row: every row of a layer loses the same number of weights.
    """

    rowwise: ClassVar[bool] = False
    nm: str | None = None

    def scores(
        self, model: nn.Module, weights: list[PrunableWeight], data: Iterable | None
    ) -> list[torch.Tensor]:
        """One score tensor per weight (same shape); higher means more important."""
        raise NotImplementedError

    def prune(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        scope: str = "global",
        data: Iterable | None = None,
        selection: LayerSelection = ALL_LAYERS,
        target: str = "sparsity",
        example_input: torch.Tensor | None = None,
    ) -> nn.Module:
        pattern = check_nm(self.nm, sparsity, target, selection)
        sparsity = self._requested_sparsity(model, sparsity, target, scope, data, selection,
                                            example_input)
        weights = selection.weights(model)
        with torch.no_grad():
            scores = [s.detach().to(torch.float64 if s.dtype == torch.float64 else torch.float32)
                      for s in self.scores(model, weights, data)]
            for weight, score in zip(weights, scores, strict=True):
                if weight.mask is not None:  # already-pruned weights stay pruned
                    score[weight.mask == 0] = float("-inf")
            pairs = list(zip(weights, scores, strict=True))
            if pattern is not None:
                for weight, score in pairs:
                    _install(weight, nm_keep_mask(score, *pattern, input_dim(
                        weight.module, score), weight.name))
                return model
            for group, target in override_groups(pairs, selection.layer_sparsity):
                if self.rowwise:
                    for weight, score in group:
                        value = sparsity if target is None else target
                        _install(weight, row_keep_mask(score, value, output_dim(
                            weight.module, score)))
                elif scope == "layer" or target is not None:
                    for weight, score in group:
                        _apply(weight, score, sparsity if target is None else target)
                elif scope in DISTRIBUTIONS:
                    _apply_distribution(group, sparsity, scope)
                else:
                    _apply_global(group, sparsity)
        return model


def check_nm(nm: str | None, sparsity: float, target: str,
             selection: LayerSelection) -> tuple[int, int] | None:
    """Parse the ``nm`` option and refuse targets it cannot meet: N:M fixes every layer's
    sparsity at 1 − N/M, so another sparsity, a compression/speed-up target or per-layer
    overrides would be silently ignored."""
    pattern = parse_nm(nm)
    if pattern is None:
        return None
    n, m = pattern
    implied = 1 - n / m
    if target == "sparsity":
        sparsity = check_sparsity(sparsity)
    if target != "sparsity" or abs(sparsity - implied) > 1e-4:  # "0.6667" for 1:3
        given = f"sparsity {sparsity}" if target == "sparsity" else f"a {target} target"
        raise InvalidValueError(
            f"nm={nm!r} prunes {implied:.4g} of every layer (keeps {n} of each {m}); pass "
            f"sparsity={implied:.4g} instead of {given}")
    if selection.layer_sparsity:
        raise InvalidValueError(
            f"nm={nm!r} fixes every layer's sparsity; layer_sparsity overrides cannot be combined "
            "with it (use include/exclude to choose the layers)")
    return pattern


@functools.cache
def _option_adapters(cls: type[Method]) -> dict[str, tuple[Any, pydantic.TypeAdapter]]:
    """Each option's annotated type and its validator, built once per class. An option whose
    type pydantic cannot check (one defined where the class cannot see it) is taken as is."""
    hints = _option_hints(cls)
    adapters = {}
    for f in dataclasses.fields(cls):
        if f.init:
            hint = hints.get(f.name, Any)
            try:
                adapter = pydantic.TypeAdapter(hint, config=_ANY_TYPE)
            except pydantic.PydanticUserError:
                hint, adapter = Any, pydantic.TypeAdapter(Any)
            adapters[f.name] = (hint, adapter)
    return adapters


#: Options may be of any class (a tensor, the user's own type): checked with isinstance.
_ANY_TYPE = pydantic.ConfigDict(arbitrary_types_allowed=True)


def _option_hints(cls: type) -> dict[str, Any]:
    """The classes' annotations resolved (Annotated bounds kept); one that names a type the
    class's module cannot see (a function's local class) becomes ``Any``."""
    try:
        return get_type_hints(cls, include_extras=True)
    except NameError:
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            module = sys.modules.get(klass.__module__)
            namespace = vars(module) if module is not None else {}
            for name, hint in vars(klass).get("__annotations__", {}).items():
                if isinstance(hint, str):
                    try:  # what get_type_hints does, one annotation at a time
                        hint = eval(hint, namespace)
                    except NameError:
                        hint = Any
                hints[name] = hint
        return hints


def _either(words: tuple[str, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, [", ".join(words[:-1]), words[-1]]))


def _has_bool(value: Any) -> bool:
    """Whether ``value`` is or holds a bool (numpy's too), which no number option takes."""
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (list, tuple)):
        return any(map(_has_bool, value))
    if isinstance(value, Mapping):
        return any(map(_has_bool, value.values()))
    return False


def _finite(value: Any) -> bool:
    """False for a NaN or infinite float, alone or inside a list/tuple/dict of options."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    if isinstance(value, Mapping):
        return all(map(_finite, value.values()))
    return True


def _type_name(hint: Any) -> str:
    """``int``, ``int >= 1 | None``, ``list[float > 0]``, ``one of 'a', 'b'``: how an option's
    type reads in an error message and in ``prunelab methods``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is Annotated:
        bounds = [f"{symbol} {getattr(b, attr)}" for info in args[1:]
                  for b in getattr(info, "metadata", [])
                  for attr, symbol in _BOUNDS.items() if hasattr(b, attr)]
        return " ".join([_type_name(args[0]), " and ".join(bounds)]).strip()
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (list, tuple, dict) and args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


Pair = tuple[PrunableWeight, torch.Tensor]


def override_groups(
    pairs: list[Pair], overrides: Mapping[str, float]
) -> list[tuple[list[Pair], float | None]]:
    """Split (weight, score) pairs into override groups (own sparsity) and the rest (None)."""
    groups: list[tuple[list[Pair], float | None]] = []
    rest = list(pairs)
    for pattern, value in overrides.items():
        value = check_sparsity(value, f"layer_sparsity[{pattern!r}]")
        members = [p for p in rest if p[0].matches([pattern])]
        if not members:
            raise InvalidValueError(f"layer_sparsity pattern {pattern!r} matches no prunable layer")
        rest = [p for p in rest if not p[0].matches([pattern])]
        groups.append((members, value))
    if rest:
        groups.append((rest, None))
    return groups


def _apply(weight: PrunableWeight, score: torch.Tensor, sparsity: float) -> None:
    keep = keep_mask_from_scores(score, round(sparsity * score.numel()))
    _install(weight, keep)


def _apply_distribution(pairs: list[Pair], sparsity: float, kind: str) -> None:
    """Each layer pruned to its share of the budget under ``kind`` (ER, ERK)."""
    shapes = [tuple(score.shape) for _, score in pairs]
    counts = layer_keep_counts(shapes, 1.0 - sparsity, kind)
    for (weight, score), kept in zip(pairs, counts, strict=True):
        keep = keep_mask_from_scores(score, score.numel() - kept)
        _install(weight, keep)


def _apply_global(pairs: list[Pair], sparsity: float) -> None:
    flat = torch.cat([score.reshape(-1) for _, score in pairs])
    keep = keep_mask_from_scores(flat, round(sparsity * flat.numel()))
    parts = keep.split([score.numel() for _, score in pairs])
    for (weight, score), part in zip(pairs, parts, strict=True):
        _install(weight, part.view_as(score))


def _install(weight: PrunableWeight, keep: torch.Tensor) -> None:
    old = weight.mask
    if old is not None:
        keep = keep & (old != 0)
    weight.set_mask(keep)
