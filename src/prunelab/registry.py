"""A small name -> object registry shared by methods, models and datasets.

Registering by name is what lets the CLI, the benchmark and the docs pick up a new method, model or
dataset without edits anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prunelab.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes or factory functions)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` adds the decorated object under ``name``."""

        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names raise with the valid list."""
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def names(self) -> list[str]:
        return sorted(self._items)
