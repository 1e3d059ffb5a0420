"""TinyCLIP automatic weight inheritance: learn which heads, neurons and channels to keep.

Wu et al., "TinyCLIP" (ICCV 2023), automatic inheritance, after CoFi (Xia et al., ACL 2022):
the student starts as a copy of the source with hard-concrete masks on every head, MLP
neuron and residual channel (:mod:`compress.masks`); for ``prune_step`` steps the mask logits
learn (lr ``mask_lr``) under the distillation loss plus a sparsity Lagrangian on the expected
sparsity p against a target q that ramps from ``start_sparsity`` to ``target_sparsity`` over
``ramp_steps`` (multipliers by gradient ascent, lr ``lambda_lr``); then the masks are folded
into the weights, the model is made physically smaller, and training continues on it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from compress.masks import (
    SparsityLagrangian,
    attach_masks,
    count_prunable,
    get_masks,
    prune_masked,
    sparsity,
)
from compress.masks.gates import LOG_ALPHA_INIT
from compress.masks.lagrangian import MODES
from compress.models.towers import resolve_towers
from compress.plugins import Inheritance
from compress.registry import INHERITANCE, SCHEDULES, spec_text

logger = logging.getLogger(__name__)
BUDGETS = ("pooled", "per_tower")


@INHERITANCE.register("auto")
class AutoInheritance(Inheritance):
    """TinyCLIP automatic inheritance: L0 masks + sparsity Lagrangian, then physical pruning.

    ``target_sparsity``: fraction of the prunable parameters to remove (every tower parameter but
    the token embedding); ``budget``: ``pooled`` (one budget over the masked towers, TinyCLIP) or
    ``per_tower`` (each tower reaches the target); ``lagrangian``: ``two_sided`` (paper, CoFi)
    or ``one_sided`` (official code); ``lambda_init``: None = 0 (two-sided) / 10 (one-sided);
    ``target_schedule``: a schedule spec replacing the default ``linear_ramp``; ``layer_gates``:
    CoFi's whole-block gates (off in TinyCLIP); ``towers``: ``both``, ``vision`` or ``text``;
    ``total_steps``: offered by the engine (``train.steps``) to refuse a ``prune_step`` never reached.

    ``round_to`` (default 8; 1 = none): the deterministic masks keep a multiple of it of MLP neurons per
    layer and residual channels per tower (nearest multiple, ties up, never below it unless 0; the
    next units by log_alpha are added or dropped; heads are whole units): the masked model in eval
    mode, its logged mask sparsity and the pruned export stay one function, and the achieved sparsity
    counts the rounding. 8: what tensor cores and fp32 SIMD want, under 0.3 points of sparsity on a
    ViT-B/32; 64 can move it by ~1.4 points per tower. Above a masked tower's smallest width: refused.
    """

    needs_student_config = False
    context = ("total_steps",)
    target_parameter = "target_sparsity"

    def __init__(
        self,
        target_sparsity: float = 0.5,
        prune_step: int = 3000,
        ramp_steps: int = 1000,
        start_sparsity: float = 0.0,
        target_schedule: str | Mapping[str, Any] | None = None,
        lagrangian: str = "two_sided",
        lambda_init: float | None = None,
        mask_lr: float = 0.02,
        lambda_lr: float = 0.02,
        budget: str = "pooled",
        layer_gates: bool = False,
        towers: str | list[str] = "both",
        init_log_alpha: float = LOG_ALPHA_INIT,
        total_steps: int | None = None,
        round_to: int = 8,
    ) -> None:
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if prune_step < 1:
            raise ValueError(f"prune_step must be >= 1, got {prune_step}")
        if total_steps is not None and prune_step > total_steps:
            raise ValueError(
                f"prune_step ({prune_step}) is after the last step (train.steps = {total_steps}): the masks "
                "would never be folded and the target sparsity never reached; lower prune_step"
            )
        if not 0.0 <= start_sparsity <= target_sparsity:
            raise ValueError(f"start_sparsity must be in [0, target_sparsity={target_sparsity}], got {start_sparsity}")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        if target_schedule is None and ramp_steps > prune_step:
            raise ValueError(
                f"ramp_steps ({ramp_steps}) is longer than prune_step ({prune_step}): the target sparsity "
                "would not be reached before pruning; set ramp_steps <= prune_step"
            )
        for key, value in (("mask_lr", mask_lr), ("lambda_lr", lambda_lr)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0 (a learning rate), got {value}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1 (1 = no rounding), got {round_to!r}")
        if lagrangian not in MODES:
            raise ValueError(f"lagrangian must be one of {', '.join(MODES)}, got {lagrangian!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        self.target_sparsity = float(target_sparsity)
        self.prune_step = int(prune_step)
        self.lagrangian = lagrangian
        self.lambda_init = lambda_init
        self.mask_lr, self.lambda_lr = float(mask_lr), float(lambda_lr)
        self.budget = budget
        self.layer_gates = bool(layer_gates)
        self.towers = resolve_towers(towers if isinstance(towers, str) else tuple(towers))
        self.init_log_alpha = float(init_log_alpha)
        self.round_to = round_to
        spec = target_schedule or {"name": "linear_ramp", "start": start_sparsity, "end": target_sparsity,
                                   "steps": ramp_steps}
        self.schedule = SCHEDULES.build(spec, context={"base_value": target_sparsity, "total_steps": prune_step})
        self.step = 0
        self.full_size: dict[str, int] = {}
        self.ramp_text = (None if target_schedule is not None else
                          f"linear ramp {start_sparsity:.1%} -> {self.target_sparsity:.1%} of the source over "
                          f"{ramp_steps} steps")
        self.target_schedule = target_schedule

    # -- what the engine asks of it --------------------------------------------------------
    def describe_student(self, source: str) -> str:
        return (f"{source} with learned masks (heads, MLP neurons, residual channels), physically pruned at step "
                f"{self.prune_step}")

    def replacement_step(self) -> int | None:
        return self.prune_step

    def schedule_lines(self, total_steps: int) -> list[str]:
        """The lr after pruning (TinyCLIP's cosine without a new warm-up) and the ramp of the target."""
        ramp = spec_text(self.target_schedule) if self.ramp_text is None else self.ramp_text
        return [f"after pruning at step {self.prune_step}: the lr follows a cosine from its value there to 0 at step "
                f"{total_steps} (no new warm-up)",
                f"target sparsity: {ramp}, masks learned until step {self.prune_step}"]

    def restore(self, record: Mapping[str, Any], source: nn.Module | None) -> nn.Module | None:
        """A masked student is rebuilt as :meth:`inherit` made it (a copy of the source with masks); once pruned
        it is a plain student of its recorded structure (None: the engine rebuilds it)."""
        if not record.get("masked"):
            return None
        if source is None:
            raise ValueError("a masked student is rebuilt from its source, and this stage has none")
        return self.inherit(None, source)

    # -- the contract ---------------------------------------------------------------------
    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        """A copy of ``source`` (trainable, attention converted) with masks and multipliers attached."""
        model = copy.deepcopy(source)
        model.requires_grad_(True)  # the source is usually the frozen teacher
        masks = attach_masks(model, self.towers, layer_gates=self.layer_gates, init=self.init_log_alpha,
                             round_to=self.round_to)
        device = masks.mask_parameters()[0].device
        keys = ("all",) if self.budget == "pooled" else tuple(masks.towers)
        for key in keys:
            masks.lagrangians[key] = SparsityLagrangian(self.lagrangian, self.lambda_init).to(device)
        self.full_size = {name: count_prunable(model, (name,)) for name in self.towers}
        logger.info("auto inheritance: masks on %s, %s prunable parameters, target sparsity %.3f at step %d",
                    "+".join(self.towers), sum(self.full_size.values()), self.target_sparsity, self.prune_step)
        return model

    def expected_sparsity(self, student: nn.Module) -> dict[str, Tensor]:
        """Expected sparsity per masked tower and pooled (``"all"``), differentiable."""
        masks = get_masks(student)
        kept = {name: t.expected_size() for name, t in masks.towers.items()}
        full = {name: t.costs.full for name, t in masks.towers.items()}
        return sparsity(kept, full, pooled=True)

    def regularizer(self, student: nn.Module, step: int) -> dict[str, Tensor]:
        masks = get_masks(student)
        if masks is None:
            return {}
        self.step = step
        target = self.schedule(step)
        p = self.expected_sparsity(student)
        terms = [lagrangian(p[key], target) for key, lagrangian in masks.lagrangians.items()]
        return {"lagrangian": torch.stack(terms).sum().float()}

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        """Mask logits (minimised) and Lagrange multipliers (maximised: gradient ascent)."""
        masks = get_masks(student)
        if masks is None:
            return []
        return [
            {"params": masks.mask_parameters(), "lr": self.mask_lr, "weight_decay": 0.0, "name": "mask_logits"},
            {"params": list(masks.lagrangians.parameters()), "lr": self.lambda_lr, "weight_decay": 0.0,
             "maximize": True, "name": "lagrange_multipliers"},
        ]

    def on_step(self, student: nn.Module, step: int) -> nn.Module | None:
        """Clamp log_alpha after every step; at ``prune_step`` return the pruned model."""
        masks = get_masks(student)
        if masks is None:
            return None
        masks.clamp_()
        if step < self.prune_step:
            return None
        pruned = prune_masked(student, inplace=True)
        logger.info("auto inheritance: pruned at step %d: %s", step, _summary(pruned.clip_structure))
        return pruned

    def replaces_at(self, student: nn.Module, step: int) -> bool:
        """:meth:`on_step` prunes at the first step from ``prune_step`` on, while the masks are attached."""
        return step >= self.prune_step and get_masks(student) is not None

    @torch.no_grad()
    def log_values(self, student: nn.Module) -> dict[str, float]:
        masks = get_masks(student)
        values: dict[str, float] = {}
        if masks is None:
            kept = {name: count_prunable(student, (name,)) for name in self.full_size}
            values["pruned"] = 1.0
            values.update(_sparsities(kept, self.full_size, "sparsity"))
            for name, tower in (getattr(student, "clip_structure", None) or {}).items():
                values[f"channels/{name}"] = float(tower["width"])
                values[f"heads/{name}"] = float(sum(tower["heads"]))
                values[f"neurons/{name}"] = float(sum(tower["mlp_width"]))
            return values
        values["pruned"] = 0.0
        values["target_sparsity"] = float(self.schedule(self.step))
        values.update({f"expected_sparsity/{k}": float(v) for k, v in self.expected_sparsity(student).items()})
        hard = {name: float(t.deterministic_size()) for name, t in masks.towers.items()}
        values.update(_sparsities(hard, {n: t.costs.full for n, t in masks.towers.items()}, "mask_sparsity"))
        for key, lagrangian in masks.lagrangians.items():
            values[f"lambda_1/{key}"] = lagrangian.lambda_1.item()
            values[f"lambda_2/{key}"] = lagrangian.lambda_2.item()
        for name, t in masks.towers.items():
            values.update({f"{k}/{name}": float(v) for k, v in t.counts().items()})
        return values

    def export(self, student: nn.Module) -> nn.Module:
        """The physically pruned model (pruned now, on a copy, if the masks are still attached)."""
        return prune_masked(student) if get_masks(student) is not None else student

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "full_size": dict(self.full_size)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.full_size = {name: int(n) for name, n in state["full_size"].items()}


def _sparsities(kept: Mapping[str, float], full: Mapping[str, float], label: str) -> dict[str, float]:
    out = {f"{label}/{name}": 1.0 - kept[name] / full[name] for name in kept}
    out[f"{label}/all"] = 1.0 - sum(kept.values()) / sum(full[name] for name in kept)
    return out


def _summary(structure: Mapping[str, Any]) -> str:
    return "; ".join(f"{name}: width {t['width']}, heads {t['heads']}, mlp {t['mlp_width']}"
                     for name, t in structure.items())
