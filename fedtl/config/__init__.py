"""The experiment config: a tree of validated frozen dataclasses (see ``schema.py`` and ``sections.py``)."""

from fedtl.config.fields import ConfigError, Scalar
from fedtl.config.load import all_keys, apply_overrides, flwr_app_config_table, from_dict, load_config, resolve_key
from fedtl.config.schema import ExperimentConfig
from fedtl.config.sections import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    PrivacyConfig,
    SimulationConfig,
    StrategyConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "ExperimentConfig", "FinetuneConfig", "ModelConfig", "PretrainConfig", "PrivacyConfig",
    "Scalar", "SimulationConfig", "StrategyConfig", "all_keys", "apply_overrides", "flwr_app_config_table", "from_dict",
    "load_config", "resolve_key",
]
