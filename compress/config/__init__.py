"""Run configuration: YAML -> validated dataclasses, dotted overrides, stable run id.

A config names plug-ins by registry name; their parameters are checked against the
plug-in's constructor at validation time, so a typo fails before anything is built.

- :mod:`~compress.config.schema`: the dataclasses (what a config may say) and their defaults;
- :mod:`~compress.config.parsing`: YAML and dicts -> dataclasses with key-path errors;
- :mod:`~compress.config.overrides`: ``--set key.path=value``;
- :mod:`~compress.config.validate`: plug-ins, ranges and combinations;
- :mod:`~compress.config.identity`: the run id.
"""

from compress.config.errors import ConfigError, OverrideError
from compress.config.identity import identity_dict, run_id
from compress.config.overrides import apply_overrides, parse_override
from compress.config.parsing import config_from_dict, dump_config, load_config
from compress.config.schema import (
    SCHEMA_VERSION,
    DataConfig,
    DatasetConfig,
    DispatchConfig,
    EvalConfig,
    ModelSpec,
    OutputConfig,
    PluginSpec,
    RunConfig,
    TrainConfig,
    ZeroShotTaskConfig,
)
from compress.config.validate import inheritance_context, schedule_context, validate
from compress.config.yamlio import read_yaml, yaml_load

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "DispatchConfig",
    "EvalConfig",
    "ModelSpec",
    "OverrideError",
    "OutputConfig",
    "PluginSpec",
    "RunConfig",
    "TrainConfig",
    "ZeroShotTaskConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "identity_dict",
    "inheritance_context",
    "load_config",
    "parse_override",
    "read_yaml",
    "run_id",
    "schedule_context",
    "validate",
    "yaml_load",
]
