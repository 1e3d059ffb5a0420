"""TinyCLIP manual weight inheritance (leading slices, layers by a fixed rule)."""

from __future__ import annotations

import logging

from torch import nn

from compress.models.inherit import InheritanceError, check_layer_choice, inherit_weights, inheritance_map
from compress.plugins import Inheritance
from compress.registry import INHERITANCE

logger = logging.getLogger(__name__)


@INHERITANCE.register("manual")
class ManualInheritance(Inheritance):
    """TinyCLIP manual inheritance: first-k slice of every tensor, layer i <- i * floor(L_src / L_stu).

    Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance"
    (ICCV 2023), manual weight inheritance. Width: every tensor keeps its leading slice along
    every axis; attention keeps its first H_s whole heads of q, k, v (equal head dim).
    Depth (``layer_choice``, per tower ``vision_layer_choice`` / ``text_layer_choice``):
    ``interval`` i * floor(L_src / L_stu) (the paper's), ``uniform``
    round(i * (L_src - 1) / (L_stu - 1)) (first and last kept), ``first`` the first L_stu.
    ModifiedResNet stages are mapped block by block with the vision rule. ``logit_scale`` is
    not inherited. After ``inherit``, ``layer_map`` holds {tower: [source layer of layer i]}.
    """

    def __init__(
        self,
        layer_choice: str = "interval",
        vision_layer_choice: str | None = None,
        text_layer_choice: str | None = None,
        verbose: bool = True,
    ) -> None:
        self.layer_choice = check_layer_choice(layer_choice, "layer_choice")
        self.vision_layer_choice = check_layer_choice(vision_layer_choice or layer_choice, "vision_layer_choice")
        self.text_layer_choice = check_layer_choice(text_layer_choice or layer_choice, "text_layer_choice")
        self.verbose = verbose
        self.layer_map: dict[str, list[int]] = {}

    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        self.layer_map = inherit_weights(self._needs(student), source, self._choices())
        if self.verbose:
            for group, layers in self.layer_map.items():
                logger.info("manual inheritance: %s layers <- source layers %s", group, layers)
        return student

    def check(self, student: nn.Module | None, source: nn.Module) -> None:
        """The student no larger than its source in any dimension, every tensor with its source tensor: the
        mapping :meth:`inherit` copies, computed and dropped (on ``meta`` models it costs no memory)."""
        inheritance_map(self._needs(student), source, self._choices())

    def _choices(self) -> dict[str, str]:
        return {"vision": self.vision_layer_choice, "text": self.text_layer_choice}

    @staticmethod
    def _needs(student: nn.Module | None) -> nn.Module:
        if student is None:
            raise InheritanceError("inheritance 'manual' needs a student architecture (set student.model)")
        return student
