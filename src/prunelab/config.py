"""Configuration files: YAML in, validated pydantic models out, readable errors.

A misspelled key fails before any work starts, naming the key, its place and the closest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from prunelab.errors import ConfigError, did_you_mean

M = TypeVar("M", bound=BaseModel)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (``X``, ``X | None``, ``list[X]``, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _value_type(annotation: Any) -> Any:
    """What a field holds: one model, ``{kind: model}`` for a union tagged by ``kind``, or None."""
    models = _models_in(annotation)
    if len(models) == 1:
        return models[0]
    return {m.model_fields["kind"].default: m for m in models if "kind" in m.model_fields} or None


def _resolve(model: type[BaseModel], loc: tuple) -> tuple[str, list[str], Any]:
    """Follow an error location through the nested models.

    Returns the location as the user wrote it (pydantic inserts a union member's tag:
    ``schedule.iterative.rounds`` is ``schedule.rounds`` in the file), the keys allowed where
    the location ends, and what the last key holds.
    """
    shown: list = []
    container: type[BaseModel] | None = None
    current: Any = model
    for part in loc:
        if isinstance(part, int):  # a list index: the items have the list's type
            shown.append(part)
            continue
        if isinstance(current, dict) and part in current:  # pydantic's tag, not the user's key
            current = current[part]
            continue
        shown.append(part)
        if isinstance(current, type) and issubclass(current, BaseModel):
            container, field = current, current.model_fields.get(part)
            current = _value_type(field.annotation) if field is not None else None
        else:
            container = current = None
    where = ".".join(str(p) for p in shown)
    return where, list(container.model_fields) if container else [], current


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line: each problem (where, what, and for unknown keys the closest valid key)."""
    return f"invalid configuration in {source}: " + "; ".join(_problems(error, model, ""))


def _problems(error: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    """Each problem of ``error`` at its location as the user wrote it, below ``prefix``."""
    lines = []
    for item in error.errors():
        where, valid, holds = _resolve(model, tuple(item["loc"]))
        where = ".".join(part for part in (prefix, where) if part)
        inner = (item.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigValidationError):  # a CheckedModel inside: its problems
            lines += _problems(inner.validation_error, inner.model, where)
        elif item["type"] == "extra_forbidden":
            hint = did_you_mean(str(item["loc"][-1]), valid)
            allowed = f" Allowed keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"unknown key {where or '(top level)'!r}.{hint}{allowed}")
        elif item["type"] == "union_tag_invalid" and isinstance(holds, dict):
            tag = str(item["ctx"]["tag"])
            lines.append(f"{where}.kind: unknown kind {tag!r}.{did_you_mean(tag, holds)} "
                         f"Kinds: {', '.join(sorted(holds))}.")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = "" if "got " in message else f" (got {item.get('input')!r})"
            lines.append(f"{where}: {message}{got}" if where else message)
    return lines


class ConfigValidationError(ConfigError):
    """A :class:`ConfigError` that keeps pydantic's error, so that the model containing the one
    that failed reports each problem at its full location (``train.epochs``)."""

    def __init__(self, validation_error: ValidationError, model: type[BaseModel]):
        self.validation_error, self.model = validation_error, model
        super().__init__(format_validation_error(validation_error, model, model.__name__))


class CheckedModel(BaseModel):
    """A pydantic model whose constructor raises :class:`ConfigError` (one readable message, a
    ``PrunelabError`` and a ``ValueError``) instead of pydantic's raw ``ValidationError``, so
    ``TrainRecipe(epochs=-1)`` in Python reads like the same mistake in a YAML file."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigValidationError(exc, type(self)) from None


def validate(model: type[M], data: Any, source: str = "the configuration") -> M:
    """Build ``model`` from ``data`` or raise :class:`ConfigError` with a readable message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{source} must be a mapping of keys to values, not {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file; a missing or malformed file raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"cannot read the config file {str(path)!r}: {reason}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {_yaml_problem(exc, text)}"
                          ) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error on one line: where, what, and the offending line itself."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    lines = text.splitlines()
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    shown = next((lines[m.line].strip() for m in (mark, context_mark)
                  if m is not None and m.line < len(lines) and lines[m.line].strip()), "")
    while_ = ""
    if context and context_mark is not None and context_mark.line != mark.line:
        while_ = f" ({context} that starts on line {context_mark.line + 1})"
    elif context:
        while_ = f" ({context})"
    return (f"line {mark.line + 1}, column {mark.column + 1}: {problem}{while_}"
            + (f": {shown!r}" if shown else ""))


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must contain a mapping of keys to values")
    return data


def load_config(model: type[M], path: str | os.PathLike, overrides: dict | None = None) -> M:
    """Validate a YAML file into ``model``, with top-level ``overrides`` (e.g. from CLI flags)."""
    return validate(model, {**load_yaml_mapping(path), **(overrides or {})}, source=str(path))
