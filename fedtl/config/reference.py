"""The configuration reference (``docs/config.md``), generated from the schema itself.

Every key's type, default and allowed values come from ``ExperimentConfig``'s fields; its
description is the comment written next to the field in ``schema.py`` or ``sections.py`` (so
the schema and its documentation cannot drift: a test keeps ``docs/config.md`` equal to this
output). Registry-valued keys list the names of the registry's catalogue (``catalogue.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

from fedtl.config.fields import fields_of, resolve_choices
from fedtl.config.schema import ExperimentConfig

_INTRO = """# Configuration reference

Generated from the schema (`fedtl/config/schema.py`, `sections.py`) by `fedtl config --markdown`; a
test keeps this file equal to that output, so edit the schema's comments, not this page.

A run's config is a TOML file (`fedtl simulate --config FILE`), every key optional (the defaults are the
offline default study). Override any key with `--set key=value` (a full dotted key, or a leaf that is
unique: `--set rounds=20 --set mode=full`); under `flwr run`, with `--run-config "key=value"`. The
resolved config of a run is its folder's `config.toml`; `fedtl config` prints it. Unknown keys, wrong
types and values out of range are refused, naming the key and what is allowed.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of ``cls``: the comment lines just above it and the one at its end."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in typing.cast(ast.ClassDef, ast.parse(source).body[0]).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row >= 1 and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        inline = comments.get(node.end_lineno or node.lineno)
        out[node.target.id] = " ".join([*above, *([inline] if inline else [])])
    return out


def _allowed(meta: typing.Mapping[str, Any]) -> str:
    parts = []
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        parts.append(f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
    if "choices" in meta:
        parts.append(", ".join(f"`{c}`" for c in resolve_choices(meta["choices"])))
    return "; ".join(parts)


def _default(f: dataclasses.Field[Any]) -> str:
    value = f.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section(cls: type, prefix: str) -> list[str]:
    comments = field_comments(cls)
    rows = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    nested: list[tuple[str, type]] = []
    for key, (f, tp) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            nested.append((key, tp))
            continue
        rows.append(f"| `{prefix}{key}` | {tp.__name__} | {_default(f)} | {_cell(_allowed(f.metadata))} | "
                    f"{_cell(comments.get(f.name, ''))} |")
    out = rows
    for key, tp in nested:
        doc = inspect.getdoc(tp) or ""
        out += ["", f"## `[{key}]`", "", doc.splitlines()[0] if doc else "", "", *_section(tp, f"{prefix}{key}.")]
    return out


def markdown() -> str:
    """The whole reference as Markdown."""
    body = ["## Top level", "", inspect.getdoc(ExperimentConfig).splitlines()[0], "",
            *_section(ExperimentConfig, "")]
    return _INTRO + "\n" + "\n".join(body) + "\n"


__all__ = ["field_comments", "markdown"]
