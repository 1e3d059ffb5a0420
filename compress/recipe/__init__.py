"""The Recipe: the one place where a config becomes a run, and the only caller of the plug-in registries.

:mod:`compress.config` is pure data (schema, parsing, overrides, YAML, the config's own checks). This package
adds what needs the plug-ins: validation (:mod:`~compress.recipe.checks`, :mod:`~compress.recipe.validate`),
loading a config (:mod:`~compress.recipe.loading`), the stages with their targets
(:mod:`~compress.recipe.stages`), the run id (:mod:`~compress.recipe.identity`), the context the engine
supplies to plug-ins (:mod:`~compress.recipe.context`), the builders (:mod:`~compress.recipe.build`) and the
:class:`~compress.recipe.recipe.Recipe` that validation, ``--dry-run``'s plan, the run id and the run read.
"""

from compress.recipe.build import build_inheritance, build_losses, build_schedule
from compress.recipe.context import inheritance_context, schedule_context
from compress.recipe.identity import config_hash, identity_dict, run_dir_for, run_dir_of, run_id, run_id_of
from compress.recipe.loading import config_from_dict, load_config
from compress.recipe.recipe import Recipe
from compress.recipe.stages import pruned_towers, resolve_stages, with_source_fraction
from compress.recipe.validate import validate

__all__ = [
    "Recipe",
    "build_inheritance",
    "build_losses",
    "build_schedule",
    "config_from_dict",
    "config_hash",
    "identity_dict",
    "inheritance_context",
    "load_config",
    "pruned_towers",
    "resolve_stages",
    "run_dir_for",
    "run_dir_of",
    "run_id",
    "run_id_of",
    "schedule_context",
    "validate",
    "with_source_fraction",
]
