"""A small name -> object registry, shared by backbones, modes, strategies and data.

timm-style: ``@REGISTRY.register("name")`` adds an entry, a duplicate name is an
error, and an unknown name is an error that lists the close matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedtl.errors import RegistryError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Named entries of one kind (e.g. ``"backbone"``).

    Parameters
    ----------
    kind : str
        What the entries are, used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice; names must be unique")
            self._entries[name] = entry
            return entry

        return add

    def register_wrapped(self, name: str, wrap: Callable[[F], T]) -> Callable[[F], F]:
        """A decorator that registers ``wrap(f)`` under ``name`` and returns ``f`` itself: for entries
        that hold a function and its facts (a mode, a strategy, a backbone)."""
        add = Registry.register(self, name)

        def decorate(f: F) -> F:
            add(wrap(f))
            return f
        return decorate

    def get(self, name: str) -> T:
        """Return the entry called ``name``.

        Raises
        ------
        RegistryError
            If no entry has that name; the message lists the close matches and all names.
        """
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
