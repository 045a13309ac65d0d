"""Registered strategies: the *when* (schedules) and the *after* (recoveries) of a pruning run.

A strategy is a small pydantic model registered by name, like a method: its ``kind`` is its name,
its fields are its options, its docstring is its documentation. Specs name it by ``kind``
(``schedule: {kind: iterative, rounds: 3}``, or just ``schedule: iterative``), and the config
type that accepts every registered strategy is built from the registry, so a new strategy file is
picked up by configs, sweeps, the CLI and the docs without edits elsewhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args

from pydantic import BeforeValidator, ConfigDict, Field

from prunelab.config import CheckedModel
from prunelab.registry import Registry

S = TypeVar("S", bound="Strategy")


class Strategy(CheckedModel):
    """Base of schedules and recoveries: ``kind`` names the registered strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    registry: ClassVar[Registry]

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        return inspect.cleandoc(cls.__doc__ or "").splitlines()[0] if cls.__doc__ else ""

    def label(self) -> str:
        """``kind``, with the options that differ from their defaults: ``scratch-b(cap=2)``.

        Results are grouped by this, so two variants of one strategy in a sweep stay apart.
        """
        changed = [f"{name}={value}" for name, value in self.model_dump().items()
                   if name != "kind" and value != type(self).model_fields[name].default]
        return f"{self.kind}({', '.join(changed)})" if changed else self.kind

    @classmethod
    def option_table(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each option (every field but ``kind``)."""
        return [(name, _type_name(f.annotation), f.default)
                for name, f in cls.model_fields.items() if name != "kind"]


def register_strategy(registry: Registry) -> Callable[[type[S]], type[S]]:
    """Class decorator: register a strategy under the value of its ``kind: Literal[...]``."""

    def add(cls: type[S]) -> type[S]:
        (name,) = get_args(cls.model_fields["kind"].annotation)
        if cls.model_fields["kind"].default != name:
            raise TypeError(f"{cls.__name__}: kind must default to {name!r}")
        return registry.register(name)(cls)

    return add


def strategy_field(registry: Registry, default: str) -> Any:
    """The pydantic type accepting any strategy of ``registry`` (a bare name stands for
    ``{kind: name}``), discriminated by ``kind``; built once every strategy is registered."""
    classes = [cls for _, cls in registry.items()]
    union = Union[tuple(classes)] if len(classes) > 1 else classes[0]  # noqa: UP007

    def named(value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": default, **value}
        return value

    return Annotated[union, Field(discriminator="kind"), BeforeValidator(named)]


def strategies_markdown(title: str, registry: Registry) -> list[str]:
    """A docs section: each registered strategy with its docstring and options."""
    lines = [f"# {title}", ""]
    for name, cls in registry.items():
        lines += [f"## `{name}`", "", inspect.cleandoc(cls.__doc__ or ""), "",
                  *options_markdown(cls.option_table())]
    return lines


def options_markdown(options: list[tuple[str, str, Any]]) -> list[str]:
    """A markdown table of ``(name, type, default)`` options (nothing when there are none)."""
    if not options:
        return []
    rows = [f"| `{o}` | {_cell(t)} | {_cell(repr(d))} |" for o, t, d in options]
    return ["| option | type | default |", "| --- | --- | --- |", *rows, ""]


def _cell(text: str) -> str:
    """Code text for a markdown table cell (pipes escaped)."""
    return "`" + text.replace("|", "\\|") + "`"


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
