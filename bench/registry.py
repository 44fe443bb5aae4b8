"""Named components of one kind (attacks, defences, protocols, model aliases).

A `Registry` maps names to objects of one kind, optionally checked against a base class. It
refuses a second, different object under a taken name (so a plug-in cannot silently replace a
built-in), and an unknown name raises the registry's own error listing the names it knows.
Like lm-evaluation-harness's `register_*` decorators, with one small class instead of one
mechanism per kind. A component can also be named by its file (`is_file_spec`). This module
imports only `invbench.errors`, so every folder may use it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

from .errors import InvbenchError

T = TypeVar("T")


class RegistryError(InvbenchError, ValueError):
    """A duplicate or unknown name in a registry."""


def is_file_spec(spec: str) -> bool:
    """`path/to/file.py:Class`: a plug-in named by its file and class rather than by a registered name."""
    return ":" in spec and spec.split(":", 1)[0].endswith(".py")


def same_definition(a: object, b: object) -> bool:
    """The same object, or the same class defined again by re-running its module (a file plug-in
    loaded twice): both have one module and qualified name."""
    if a is b:
        return True
    return (isinstance(a, type) and isinstance(b, type) and a.__module__ == b.__module__
            and a.__qualname__ == b.__qualname__)


class Registry(Generic[T]):
    """name -> object of one `kind`. `base`, when given, is the class every entry must subclass;
    `error` is the exception raised for bad names (a subclass of InvbenchError)."""

    def __init__(self, kind: str, *, base: type | None = None,
                 error: type[InvbenchError] = RegistryError) -> None:
        self.kind = kind
        self.base = base
        self.error = error
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register `item` under `name`; a different item under a taken name raises."""
        if self.base is not None and not (isinstance(item, type) and issubclass(item, self.base)):
            raise self.error(f"{self.kind} {name!r}: {item!r} is not a subclass of "
                             f"{self.base.__module__}.{self.base.__qualname__}")
        taken = self._items.get(name)
        if taken is not None and not same_definition(taken, item):
            raise self.error(f"{self.kind} name {name!r} is taken by {_where(taken)}; "
                             f"{_where(item)} cannot replace it (choose another name)")
        self._items[name] = item
        return item

    def register(self, item: T) -> T:
        """Class decorator: register a class under its `name` attribute."""
        return self.add(getattr(item, "name"), item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; choose from {', '.join(self._items) or '(none)'}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> dict[str, T]:
        return dict(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def values(self) -> list[T]:
        return list(self._items.values())

    @contextmanager
    def override(self, name: str, item: T) -> Iterator[T]:
        """Put `item` under `name` for the length of a with-block (tests, experiments), then
        restore what was there: the one way to replace a registered entry."""
        missing = object()
        before = self._items.get(name, missing)
        self._items[name] = item
        try:
            yield item
        finally:
            if before is missing:
                del self._items[name]
            else:
                self._items[name] = before


def _where(item: object) -> str:
    module, name = getattr(item, "__module__", "?"), getattr(item, "__qualname__", repr(item))
    return f"{module}.{name}"
