"""The machinery of a typed config: validated frozen dataclasses, kebab-case keys.

Generic over any dataclass tree; ``schema.py`` declares fedtl's, ``load.py`` reads files
and ``--set`` overrides into it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from typing import Any, Protocol

from fedtl.errors import ConfigError

Scalar = bool | int | float | str


class Names(Protocol):
    """Allowed values that a registry names: the config's catalogue of it (``fedtl.config.catalogue``)."""

    def names(self) -> list[str]:
        """The allowed values, in the order messages and the reference list them."""
        ...


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    """Field metadata: the value must lie in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""
    return {"range": (lo, hi, lo_open)}


def one_of(source: tuple[str, ...] | Names) -> dict[str, Any]:
    """Field metadata: allowed values, a fixed tuple or a registry's names (its catalogue), read when validating."""
    return {"choices": source}


class Validated:
    """Checks every field on construction: from a file, from ``--set`` or in code alike."""

    SECTION = ""  # prefix of this section's keys in messages, e.g. "data."

    def __post_init__(self) -> None:
        for key, (f, tp) in fields_of(type(self)).items():
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"config key {self.SECTION + key!r} must be a {tp.__name__}, got {value!r}")
            else:  # frozen: write the coerced value (an int given for a float) past __setattr__
                object.__setattr__(self, f.name, check_value(self.SECTION + key, value, tp, f.metadata))


def kebab(name: str) -> str:
    """``local_epochs`` -> ``local-epochs``."""
    return name.replace("_", "-")


@functools.cache
def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Kebab-case key -> (field, resolved type) of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {kebab(f.name): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def keys_of(cls: type, prefix: str = "") -> list[str]:
    """Every dotted, kebab-case key of a dataclass tree (``finetune.local-epochs``)."""
    keys: list[str] = []
    for key, (_, tp) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(keys_of(tp, f"{prefix}{key}."))
        else:
            keys.append(prefix + key)
    return keys


def unknown_key(key: str, root: type) -> ConfigError:
    """The error for ``key``, which ``root`` does not have, with the close matches."""
    keys = keys_of(root)
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.6):
        close += [k for k in leaves[leaf] if k not in close]
    hint = f" Did you mean {', '.join(close[:4])}?" if close else " Run `fedtl config` to list the keys."
    return ConfigError(f"unknown config key {key!r}.{hint}")


def check_value(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Return ``value`` (an int made float where a float is meant) or raise ``ConfigError``."""
    # bool is an int subclass in Python; a bool where a number is meant is a mistake.
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            left = "(" if lo_open else "["
            raise ConfigError(
                f"config key {key!r} = {value!r} is out of range; allowed: "
                f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            )
    if "choices" in meta:
        allowed = resolve_choices(meta["choices"])
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=2) if isinstance(value, str) else []
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"config key {key!r} = {value!r} is not allowed.{hint} "
                              f"Allowed: {', '.join(map(str, allowed))}")
    return value


def resolve_choices(source: tuple[str, ...] | Names) -> list[str]:
    """The allowed values named by ``one_of``'s ``source``."""
    return list(source) if isinstance(source, tuple) else source.names()


def registry_choices(obj: Any) -> list[tuple[Names, str]]:
    """(catalogue, chosen name) of every field of ``obj``'s tree whose values a registry names, in field order."""
    chosen: list[tuple[Names, str]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            chosen.extend(registry_choices(value))
        elif "choices" in f.metadata and not isinstance(f.metadata["choices"], tuple):
            chosen.append((f.metadata["choices"], value))
    return chosen


def precheck(cls: type, raw: typing.Mapping[str, Any], root: type, prefix: str = "") -> None:
    """Check a whole nested dict's keys, types, ranges and choices without building anything.

    Every key and value of a file and its ``--set`` list, before any section's own checks and rules
    (which assume valid values); it imports nothing, so it fails in a fraction of a second.
    """
    fields = fields_of(cls)
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key(prefix + key, root)
        f, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + key!r} must be a table of keys, got {value!r}")
            precheck(tp, value, root, f"{prefix}{key}.")
        else:
            check_value(prefix + key, value, tp, f.metadata)


def build(cls: type, raw: typing.Mapping[str, Any], root: type) -> Any:
    """Construct dataclass ``cls`` from a nested kebab-case dict; unknown keys are errors."""
    precheck(cls, raw, root)  # every key and table shape, once, before any section is built
    return _construct(cls, raw)


def _construct(cls: type, raw: typing.Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for key, (f, tp) in fields_of(cls).items():
        if key in raw:  # sections built first; each dataclass checks its own values on construction
            kwargs[f.name] = _construct(tp, raw[key]) if dataclasses.is_dataclass(tp) else raw[key]
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass tree as a nested dict with kebab-case keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[kebab(f.name)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def flatten(nested: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Scalar] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested
