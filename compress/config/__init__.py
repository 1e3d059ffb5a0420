"""Run configuration as data: YAML -> dataclasses, dotted overrides, the config's own checks.

Pure data: nothing here knows a plug-in. Validating a config with its plug-ins, its stages, its run id and
loading a config file are the Recipe's (:mod:`compress.recipe`: ``load_config``, ``config_from_dict``,
``run_id``).

- :mod:`~compress.config.schema`: the dataclasses (what a config may say) and their defaults;
- :mod:`~compress.config.parsing`: YAML and dicts -> dataclasses with key-path errors;
- :mod:`~compress.config.overrides`: ``--set key.path=value``;
- :mod:`~compress.config.validate`: ranges and combinations of the sections;
- :mod:`~compress.config.stages`: the stages' keys on top of the top level's;
- :mod:`~compress.config.identity`: what the run id leaves out, and its hash.
"""

from compress.config.errors import ConfigError, OverrideError
from compress.config.overrides import apply_overrides, parse_override
from compress.config.parsing import dump_config, parse_config
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
    "dump_config",
    "parse_config",
    "parse_override",
    "read_yaml",
    "yaml_load",
]
