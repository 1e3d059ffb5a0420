"""The student's live forward, as DDP wraps it, and ``torch.compile`` of its towers.

The gradient cache (Gao et al. 2021) differentiates the student's per-sample outputs
(:data:`FEATURES`): :class:`LiveForward` returns them as a tuple, the form DDP's hooks see;
:func:`compile_towers` compiles the vision tower and the text transformer in place.
"""

from __future__ import annotations

from torch import Tensor, nn

from compress.models.attention import mark_causal_mask
from compress.models.forward import clip_forward
from compress.training_error import TrainingError

#: the per-sample outputs of a student forward that the losses differentiate (the gradient cache's leaves)
FEATURES = ("image_features", "text_features", "image_embeds", "text_embeds")
TOWERS = ("image", "text")


class LiveForward(nn.Module):
    """What DDP wraps: the student's forward with graph, returning its per-sample outputs (a tuple in
    the order of :data:`FEATURES`, ``None`` where not asked for). The logit scale, the losses' modules
    and a strategy's own parameters take no part in it: the trainer reduces their gradients itself."""

    def __init__(self, student: nn.Module, needs: tuple[str, ...]) -> None:
        super().__init__()
        self.student = student
        self.needs = needs

    def forward(self, images: Tensor, texts: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out = clip_forward(self.student, images, texts, self.needs)
        return tuple(getattr(out, name) for name in FEATURES)


def compile_towers(student: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """``torch.compile`` the modules that hold a CLIP student's compute, in place (``nn.Module.compile``):
    the vision tower (``visual``) and the text transformer (``text`` of a CustomTextCLIP, else
    ``transformer``). In place, the modules stay the objects they were: state-dict keys (checkpoints,
    exports) get no ``_orig_mod.`` prefix, DDP wraps the same parameters, and the token embedding, final
    norm and projections around them stay eager. Returns the compiled modules."""
    text = getattr(student, "text", None) if isinstance(getattr(student, "text", None), nn.Module) else None
    candidates = [getattr(student, "visual", None), text if text is not None else getattr(student, "transformer", None)]
    towers = [m for m in candidates if isinstance(m, nn.Module)]
    if not towers:
        raise TrainingError(f"train.compile: the student ({type(student).__name__}) has neither a `visual` tower nor "
                            "a text transformer to compile; set train.compile: false")
    if isinstance(candidates[1], nn.Module):  # the text tower's causal mask still reaches SDPA as is_causal
        mask = getattr(text if text is not None else student, "attn_mask", None)
        mark_causal_mask(candidates[1], mask if isinstance(mask, Tensor) else None)
    for module in towers:
        module.compile(backend=backend)
    return towers
