"""Reading configs: TOML files, ``--set key=value`` overrides, and pyproject's Flower table."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from fedtl.config.fields import ConfigError, build, flatten, keys_of, to_dict, unflatten, unknown_key
from fedtl.config.schema import ExperimentConfig
from fedtl.config.sections import FinetuneConfig


def all_keys() -> list[str]:
    """Every dotted, kebab-case key an ExperimentConfig accepts (``finetune.local-epochs``)."""
    return keys_of(ExperimentConfig)


def from_dict(raw: typing.Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a nested, kebab-case dict (a parsed TOML file)."""
    return typing.cast(ExperimentConfig, build(ExperimentConfig, raw, ExperimentConfig))


def resolve_key(key: str) -> str:
    """Resolve a ``--set`` key: a full dotted key, or a leaf name that is unique (``mode``)."""
    keys = all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: use one of {', '.join(matches)}")
    raise unknown_key(key, ExperimentConfig)


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal when it is one (20, 0.5, true, "x"), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict (returns a new dict)."""
    flat = flatten(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key=value (e.g. --set rounds=20)")
        flat[resolve_key(key.strip())] = parse_value(text.strip())
    return unflatten(flat)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (), *,
                resolve_paths: bool = True) -> ExperimentConfig:
    """Load a TOML config file (or the defaults), apply overrides, validate, resolve paths.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file; ``None`` uses the defaults (the offline default study).
    overrides : iterable of str
        ``key=value`` strings applied after the file, in order.
    resolve_paths : bool, optional
        Make ``pretrain.cache-dir`` and ``data.store-dir`` absolute, so that every process on this machine agrees on it
        (default). ``False`` for a deployment: each machine reads it from its own working folder.

    Returns
    -------
    ExperimentConfig
        Validated.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist. Pass --config with a TOML file, e.g. experiments/digits.toml")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
        except UnicodeDecodeError as err:  # TOML is UTF-8 by definition
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {err.object[err.start]:#x} at "
                              f"position {err.start}): save it as UTF-8, as TOML requires") from None
    cfg = from_dict(apply_overrides(raw, overrides))
    if not resolve_paths:
        return cfg
    cache = str(Path(cfg.pretrain.cache_dir).expanduser().resolve())
    store = str(Path(cfg.data.store_dir).expanduser().resolve())
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, cache_dir=cache),
                               data=dataclasses.replace(cfg.data, store_dir=store))


def flwr_app_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, generated from the defaults as written, before
    the config resolves them (``finetune.batchnorm = "auto"``: a ``--run-config init='scratch'`` resolves anew)."""
    table = ExperimentConfig().to_dict()
    table["finetune"] = to_dict(FinetuneConfig())
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": table}}}})
