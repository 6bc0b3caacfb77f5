"""A small name -> object registry, shared by backbones, modes, strategies and data.

timm-style: ``@REGISTRY.register("name")`` adds an entry, a duplicate name is an
error, and an unknown name is an error that lists the close matches. A registry the
config chooses from is built with the config's catalogue of it (``fedtl.config.catalogue``),
and refuses to register a name, or an entry's fact, that the catalogue does not declare.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fedtl.errors import RegistryError

if TYPE_CHECKING:  # only the type: the config imports this module (fedtl.batchnorm)
    from fedtl.config.catalogue import Catalogue

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Named entries of one kind (e.g. ``"backbone"``).

    Parameters
    ----------
    kind : str
        What the entries are, used in error messages.
    declared : Catalogue, optional
        The config's catalogue of this registry: every name registered must be declared there, with the
        facts its entry holds (default ``None``: a registry the config does not choose from).
    """

    def __init__(self, kind: str, *, declared: Catalogue[Any] | None = None) -> None:
        self.kind = kind
        self.declared = declared
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``.

        Raises
        ------
        RegistryError
            If ``name`` is registered already, or the catalogue does not declare it or declares other facts.
        """

        def add(entry: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice; names must be unique")
            if self.declared is not None:
                self._check_declared(name, entry, self.declared)
            self._entries[name] = entry
            return entry

        return add

    def _check_declared(self, name: str, entry: T, declared: Catalogue[Any]) -> None:
        # The config validates values and runs its rules by the catalogue alone, never importing this registry.
        where = f"{declared.name} in fedtl/config/catalogue.py"
        if name not in declared:
            raise RegistryError(f"{self.kind} {name!r} is not declared in the config's catalogue, so a config could "
                                f"not choose it: add it to {where}, with the facts the config reads")
        for fact, value in declared.facts(name).items():
            held = getattr(entry, fact, None)
            if held != value:
                raise RegistryError(f"{self.kind} {name!r} has {fact} = {held!r}, but {where} declares {value!r}, "
                                    "which is what the config reads: make the two agree")

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
