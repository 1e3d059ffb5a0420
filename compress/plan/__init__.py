"""The plan of a run without running it (``clip-compress run CONFIG --dry-run``): the Recipe of a config
(:mod:`compress.recipe`) as data (:mod:`~compress.plan.build`, with the models' sizes from
:mod:`~compress.plan.facts` and the run directory's state from :mod:`~compress.plan.state`), and formatted
(:mod:`~compress.plan.text`). Nothing is trained, downloaded or written."""

from compress.plan.build import Plan, StagePlan, build_plan, check_inheritance, check_inheritances
from compress.plan.facts import ModelFacts, architecture_facts, model_facts, shape_model
from compress.plan.state import missing_paths
from compress.plan.text import format_plan

__all__ = [
    "ModelFacts",
    "Plan",
    "StagePlan",
    "architecture_facts",
    "build_plan",
    "check_inheritance",
    "check_inheritances",
    "format_plan",
    "missing_paths",
    "model_facts",
    "shape_model",
]
