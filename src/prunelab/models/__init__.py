"""Model zoo: small classic networks by name, with torchvision classification models as fallback.

Each zoo model is a factory ``factory(num_classes, input_shape, **options) -> nn.Module``
registered with :func:`register_model`; the first line of its docstring is its one-line
description. Every module in this package is imported below, so a new model file is picked up by
:func:`create`, the CLI and the docs without edits elsewhere.

>>> model = create("resnet20", num_classes=10)              # zoo
>>> model = create("resnet18", num_classes=7)               # torchvision, random init
>>> model = create("torchvision:mobilenet_v2", num_classes=100)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import operator
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

from torch import nn

from prunelab.errors import InvalidValueError, UnknownNameError
from prunelab.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_INPUT_SHAPE = (3, 224, 224)
CIFAR_INPUT_SHAPE = (3, 32, 32)


class UnknownModelError(UnknownNameError):
    """A model name that is neither in the zoo nor a torchvision classification model.

    Close matches are drawn from both, but only the zoo names are listed (torchvision has ~80).
    """

    def __init__(self, name: str, zoo: Iterable[str], torchvision_names: Iterable[str]):
        zoo = sorted(zoo)
        super().__init__("model", name, zoo)
        close = difflib.get_close_matches(name.lower(), [*zoo, *torchvision_names], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        self.message = (
            f"unknown model {name!r}.{hint} Zoo models: {', '.join(zoo)}; any torchvision "
            "classification model also works by name (e.g. resnet50 or torchvision:resnet50)."
        )
        self.args = (self.message,)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that adds a factory to the zoo as ``name``; the factory must have a docstring."""

    def add(factory: ModelFactory) -> ModelFactory:
        if not (factory.__doc__ or "").strip():
            raise ValueError(f"model factory {name!r} needs a docstring (its description)")
        return MODELS.register(name)(factory)

    return add


def names() -> list[str]:
    """The zoo's model names, sorted (torchvision names are accepted too but not listed)."""
    return MODELS.names()


def describe(name: str) -> str:
    """The one-line description of zoo model ``name`` (first line of its docstring)."""
    return inspect.getdoc(MODELS.get(name)).splitlines()[0]


@cache
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's classification models (imported lazily: torchvision is slow)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _resolve(name: str) -> tuple[str, str]:
    """``("zoo" | "torchvision", canonical name)`` for ``name``, or raise UnknownNameError."""
    key = name.strip().lower()
    if key.startswith(TORCHVISION_PREFIX):
        key = key[len(TORCHVISION_PREFIX) :]
        if key not in torchvision_names():
            raise UnknownNameError("torchvision model", key, torchvision_names())
        return "torchvision", key
    if key in MODELS:
        return "zoo", key
    if key in torchvision_names():
        return "torchvision", key
    raise UnknownModelError(name, MODELS.names(), torchvision_names())


def check_name(name: str) -> None:
    """Raise UnknownNameError unless ``name`` is a zoo or torchvision model (builds nothing)."""
    _resolve(name)


def create(
    name: str,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    pretrained: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` with random weights for ``num_classes`` classes and one input's shape.

    ``pretrained="mnist"`` (say) loads the reference weights shipped with prunelab for that
    dataset instead (:mod:`prunelab.models.pretrained`; ``prunelab models`` lists them).

    Zoo names come first; other names (or ``torchvision:<name>``) build a torchvision
    classification model with ``weights=None``. Options the model does not take, or values out of
    range, raise :class:`InvalidValueError` naming the option. ``input_shape=None`` takes the
    model's own default (1x28x28 for the LeNets, 3x32x32 for the CIFAR models, 3x224x224 for
    torchvision). Zoo models record the shape they were built for as ``model.input_shape``.
    """
    source, key = _resolve(name)
    classes = _positive_int(num_classes)
    if classes is None:
        raise InvalidValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if source == "torchvision":
        if pretrained is not None:
            raise InvalidValueError(f"prunelab ships no weights for torchvision's {key!r} (and "
                                    "downloads none); pretrained= works for zoo models")
        shape = _check_shape(TORCHVISION_INPUT_SHAPE if input_shape is None else input_shape)
        return _create_torchvision(key, classes, shape, kwargs)
    factory = MODELS.get(key)
    if input_shape is None:
        default = inspect.signature(factory).parameters["input_shape"].default
        input_shape = CIFAR_INPUT_SHAPE if default is inspect.Parameter.empty else default
    shape = _check_shape(input_shape)
    _check_options(key, factory, kwargs)
    model = factory(num_classes=classes, input_shape=shape, **kwargs)
    model.input_shape = shape
    if pretrained is not None:
        _load_reference(model, key, pretrained, classes, shape, kwargs)
    return model


def _load_reference(model: nn.Module, name: str, dataset: str, classes: int,
                    shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    """Load shipped weights, refusing a model built differently from the one they fit."""
    from prunelab.models.pretrained import entry, load_pretrained

    info = entry(name, dataset)
    built = {"num_classes": classes, "input_shape": list(shape), "model_kwargs": kwargs}
    for key, value in built.items():
        if info.get(key, value) != value:
            raise InvalidValueError(f"the pretrained {name!r} ({dataset}) was built with "
                                    f"{key}={info[key]!r}, not {value!r}")
    load_pretrained(model, name, dataset)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one input ``model`` was built for: its ``input_shape``, else 3x224x224."""
    return tuple(getattr(model, "input_shape", TORCHVISION_INPUT_SHAPE))


def check_image_shape(
    input_shape: Sequence[int], model: str, min_size: int
) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_shape``; InvalidValueError if not 3-D or under ``min_size``.

    For the factories of convolutional models, whose pooling needs a minimum spatial size.
    """
    if len(input_shape) != 3:
        raise InvalidValueError(
            f"{model} takes images: input_shape must be (channels, height, width), "
            f"got {tuple(input_shape)}"
        )
    channels, height, width = input_shape
    if min(height, width) < min_size:
        raise InvalidValueError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels, got {height}x{width}"
        )
    return channels, height, width


def check_positive(option: str, value: Any) -> float:
    """``value`` as a float if it is a finite positive number, else InvalidValueError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise InvalidValueError(f"{option} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(value: Any) -> int | None:
    """``value`` as an int if it is a positive integer (numpy ints too, bools not), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number > 0 else None


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(_positive_int(d) for d in input_shape)
    except TypeError:
        shape = ()
    if not shape or None in shape:
        raise InvalidValueError(
            f"input_shape must be a sequence of positive integers such as (3, 32, 32), "
            f"got {input_shape!r}"
        )
    return shape


def _check_options(name: str, factory: ModelFactory, kwargs: dict[str, Any]) -> None:
    """Reject options the factory's signature does not name, listing the ones it does."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    options = [p for p in params if p not in {"num_classes", "input_shape"}]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        takes = f"its options: {', '.join(options)}" if options else "it takes no options"
        raise InvalidValueError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; {takes}."
        )


def _create_torchvision(
    name: str, num_classes: int, shape: tuple[int, ...], kwargs: dict[str, Any]
) -> nn.Module:
    """A randomly initialised torchvision model; only the channel count of ``shape`` is checked."""
    import torchvision

    if len(shape) != 3 or shape[0] != 3:
        raise InvalidValueError(
            f"torchvision model {name!r} takes RGB images, input_shape (3, H, W); got {shape}"
        )
    for reserved in ("weights", "pretrained"):
        if reserved in kwargs:
            raise InvalidValueError(
                f"option {reserved!r} is not supported: prunelab builds torchvision models with "
                "random weights (load a checkpoint to start from trained weights)"
            )
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(
            f"torchvision model {name!r} rejected options {kwargs}: {exc}"
        ) from exc


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MODELS",
    "UnknownModelError",
    "check_image_shape",
    "check_name",
    "check_positive",
    "create",
    "default_input_shape",
    "describe",
    "names",
    "register_model",
    "torchvision_names",
]
