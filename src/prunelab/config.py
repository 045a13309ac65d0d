"""Configuration files: YAML in, validated pydantic models out, readable errors.

A misspelled key fails before any work starts, naming the key, its place and the closest valid one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from prunelab.errors import ConfigError, did_you_mean

M = TypeVar("M", bound=BaseModel)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at ``loc`` (a pydantic error location) inside ``model``."""
    current: Any = model
    for part in loc[:-1]:
        is_model = isinstance(current, type) and issubclass(current, BaseModel)
        if isinstance(part, int) or not is_model:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: where, what, and for unknown keys the closest valid key."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc)
            hint = did_you_mean(str(loc[-1]), valid)
            allowed = f" Allowed keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"unknown key {where!r}.{hint}{allowed}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if loc:
                lines.append(f"{where}: {message} (got {item.get('input')!r})")
            else:
                lines.append(message)
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


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
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {exc}") from None


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must contain a mapping of keys to values")
    return data


def load_config(model: type[M], path: str | os.PathLike, overrides: dict | None = None) -> M:
    """Validate a YAML file into ``model``, with top-level ``overrides`` (e.g. from CLI flags)."""
    return validate(model, {**load_yaml_mapping(path), **(overrides or {})}, source=str(path))
