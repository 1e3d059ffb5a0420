"""No inheritance: the student keeps its random initialisation."""

from __future__ import annotations

from torch import nn

from compress.models.inherit import InheritanceError, require_clip
from compress.plugins import Inheritance
from compress.registry import INHERITANCE


@INHERITANCE.register("none")
class NoInheritance(Inheritance):
    """Random initialisation: the student trains from scratch (TinyCLIP's "w/o inheritance" baseline).

    Wu et al., TinyCLIP (ICCV 2023), Table 6: the student's weights stay as open_clip
    initialises them; the source is not read.
    """

    needs_source = False

    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        if student is None:
            raise InheritanceError("inheritance 'none' needs a student architecture (set student.model)")
        return require_clip(student, "student")
