"""Job configuration: nested dataclasses, TOML files and ``--section.key value`` overrides."""

from system.config.checkpoint import CheckpointConfig
from system.config.comm import CommConfig
from system.config.data import DataConfig
from system.config.fssdp import FSSDPConfig
from system.config.job import JobConfig
from system.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)
from system.config.metrics import MetricsConfig
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.config.parallel import ParallelConfig
from system.config.training import TrainingConfig

__all__ = [
    "CheckpointConfig",
    "CommConfig",
    "ConfigError",
    "DataConfig",
    "FSSDPConfig",
    "JobConfig",
    "MetricsConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_overrides",
]
