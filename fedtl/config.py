"""ExperimentConfig: the typed, validated description of one federated run.

One source of truth, parsed once: TOML file -> ``--set`` overrides -> frozen
dataclasses (validated here) -> flattened into Flower's ``run_config`` -> parsed
back, identically, by the ServerApp and every ClientApp.

TOML keys are kebab-case (``local-epochs``), Python fields snake_case.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open)}


def _choices(source: tuple[str, ...] | str) -> dict[str, Any]:
    """Allowed values: a fixed tuple, or ``"module:REGISTRY"`` resolved when validating."""
    return {"choices": source}


@dataclass(frozen=True)
class DataConfig:
    """Where each client's data comes from and how it is split."""

    scenario: str = field(default="digits-domain-shift", metadata=_choices("fedtl.data.scenarios:SCENARIOS"))
    partitioner: str = field(default="iid", metadata=_choices("fedtl.data.partition:PARTITIONERS"))
    alpha: float = field(default=0.5, metadata=_rng(0.0, None, lo_open=True))
    labelled_per_client: int = field(default=20, metadata=_rng(0))
    min_partition_size: int = field(default=2, metadata=_rng(0))
    test_fraction: float = field(default=0.3, metadata=_rng(0.0, 0.9, lo_open=True))
    image_size: int = field(default=16, metadata=_rng(8, 512))


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone every client fine-tunes."""

    backbone: str = field(default="small-cnn", metadata=_choices("fedtl.models.backbones:BACKBONES"))


@dataclass(frozen=True)
class FinetuneConfig:
    """How clients fine-tune: the mode and its local optimisation."""

    mode: str = field(default="feature-extraction", metadata=_choices("fedtl.models.modes:MODES"))
    lr: float = field(default=0.05, metadata=_rng(0.0, 10.0, lo_open=True))
    backbone_lr_scale: float = field(default=0.1, metadata=_rng(0.0, 1.0, lo_open=True))
    lr_decay: float = field(default=0.5, metadata=_rng(0.0, 1.0, lo_open=True))
    unfreeze_every: int = field(default=3, metadata=_rng(1))
    local_epochs: int = field(default=2, metadata=_rng(1, 1000))
    batch_size: int = field(default=16, metadata=_rng(1))
    momentum: float = field(default=0.9, metadata=_rng(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=_rng(0.0, 1.0))


@dataclass(frozen=True)
class StrategyConfig:
    """How the server samples clients and merges what they trained."""

    name: str = field(default="fedavg", metadata=_choices("fedtl.strategies.registry:STRATEGIES"))
    fraction_train: float = field(default=1.0, metadata=_rng(0.0, 1.0, lo_open=True))
    min_train_nodes: int = field(default=2, metadata=_rng(1))
    min_available_nodes: int = field(default=2, metadata=_rng(1))
    round_timeout: float = field(default=3600.0, metadata=_rng(1.0))


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training of the built-in backbone on the scenario's source data."""

    epochs: int = field(default=15, metadata=_rng(1, 1000))
    lr: float = field(default=0.05, metadata=_rng(0.0, 10.0, lo_open=True))
    batch_size: int = field(default=32, metadata=_rng(1))
    augment: bool = True
    seed: int = field(default=0, metadata=_rng(0))
    cache_dir: str = ".fedtl-cache"


@dataclass(frozen=True)
class SimulationConfig:
    """Resources of each virtual client in Flower's Ray simulation."""

    num_cpus: float = field(default=1.0, metadata=_rng(0.0, None, lo_open=True))
    num_gpus: float = field(default=0.0, metadata=_rng(0.0))


@dataclass(frozen=True)
class ExperimentConfig:
    """One federated transfer-learning run. Defaults are the offline default study."""

    name: str = "digits"
    seed: int = field(default=0, metadata=_rng(0))
    rounds: int = field(default=20, metadata=_rng(1, 100_000))
    clients: int = field(default=10, metadata=_rng(1, 100_000))
    init: str = field(default="pretrained", metadata=_choices(("pretrained", "scratch")))
    out: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        if self.strategy.min_available_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-available-nodes = {self.strategy.min_available_nodes} exceeds clients = "
                f"{self.clients}: the server would wait forever. Lower it or add clients."
            )
        if self.strategy.min_train_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-train-nodes = {self.strategy.min_train_nodes} exceeds clients = {self.clients}. "
                "Lower it or add clients."
            )

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with kebab-case keys, as in the TOML file."""
        return _to_dict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML text (what a run folder's ``config.toml`` holds)."""
        return tomli_w.dumps(self.to_dict())

    def to_run_config(self) -> dict[str, Scalar]:
        """Flatten into Flower's ``run_config`` (``"finetune.mode": "full"``)."""
        return _flatten(self.to_dict())

    @classmethod
    def from_run_config(cls, run_config: typing.Mapping[str, Any]) -> ExperimentConfig:
        """Parse a flattened Flower ``run_config`` back into a config (inverse of ``to_run_config``)."""
        return from_dict(_unflatten(dict(run_config)))

    def as_scratch(self) -> ExperimentConfig:
        """The from-scratch baseline of this run: random init, every block trained at the head's lr."""
        finetune = dataclasses.replace(self.finetune, mode="full", backbone_lr_scale=1.0)
        return dataclasses.replace(self, init="scratch", finetune=finetune)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """Copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# -- parsing --------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {_kebab(f.name): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted, kebab-case key the config accepts (``finetune.local-epochs``)."""
    keys: list[str] = []
    for key, (_, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{key}."))
        else:
            keys.append(prefix + key)
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = all_keys()
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.6):
        close += [k for k in leaves[leaf] if k not in close]
    hint = f" Did you mean {', '.join(close[:4])}?" if close else " Run `fedtl config` to list the keys."
    return ConfigError(f"unknown config key {key!r}.{hint}")


def _check_value(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
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
        allowed = _resolve_choices(meta["choices"])
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=2)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"config key {key!r} = {value!r} is not allowed.{hint} Allowed: {', '.join(allowed)}")
    return value


def _resolve_choices(source: tuple[str, ...] | str) -> list[str]:
    if isinstance(source, tuple):
        return list(source)
    module, attr = source.split(":")
    return list(getattr(importlib.import_module(module), attr).names())


def _build(cls: type, raw: typing.Mapping[str, Any], prefix: str) -> Any:
    fields = _fields(cls)
    for key in raw:
        if key not in fields:
            raise _unknown_key(prefix + key)
    kwargs: dict[str, Any] = {}
    for key, (f, tp) in fields.items():
        if key not in raw:
            continue
        value = raw[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + key!r} must be a table of keys, got {value!r}")
            kwargs[f.name] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[f.name] = _check_value(prefix + key, value, tp, f.metadata)
    return cls(**kwargs)


def from_dict(raw: typing.Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a nested, kebab-case dict (a parsed TOML file)."""
    return typing.cast(ExperimentConfig, _build(ExperimentConfig, raw, ""))


def _to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[_kebab(f.name)] = _to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def _flatten(nested: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


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
    raise _unknown_key(key)


def _parse_value(text: str) -> Any:
    # A TOML literal when it is one (20, 0.5, true, "x"); otherwise a bare string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict (returns a new dict)."""
    flat = _flatten(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key=value (e.g. --set rounds=20)")
        flat[resolve_key(key.strip())] = _parse_value(text.strip())
    return _unflatten(flat)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load a TOML config file (or the defaults), apply overrides, validate, resolve paths.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file; ``None`` uses the defaults (the offline default study).
    overrides : iterable of str
        ``key=value`` strings applied after the file, in order.

    Returns
    -------
    ExperimentConfig
        Validated, with ``pretrain.cache-dir`` made absolute so every process agrees on it.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist. Pass --config with a TOML file, e.g. experiments/digits.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
    cfg = from_dict(apply_overrides(raw, overrides))
    cache = str(Path(cfg.pretrain.cache_dir).expanduser().resolve())
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, cache_dir=cache))


def flwr_app_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, generated from the defaults."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": ExperimentConfig().to_dict()}}}})


if __name__ == "__main__":
    if sys.argv[1:] == ["--flwr-table"]:
        print(flwr_app_config_table())
