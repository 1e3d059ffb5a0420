"""Importance-ranked inheritance: score heads, MLP neurons, residual channels and layers of the source, sort, keep
the best.

Torch-Pruning's magnitude and Taylor criteria (Fang et al., "DepGraph", CVPR 2023) and Minitron's activation
importance (Muralidharan et al. 2024; sort-then-slice), see :mod:`strategies.inheritance.importance_scores`.
One shot, before training: the student is the source with the lowest-scored layers removed (``drop_layers``, by
layer score) and then the lowest-scored heads and MLP neurons, until ``target_sparsity`` of the source's
prunable parameters is removed (``budget``: ``pooled`` over ``towers`` or ``per_tower``, as ``auto``). Within a
tower, units of a kind are ranked by their score over the kind's mean score (Torch-Pruning's ``mean`` normalizer):
a unit's rank is relative to the others of its kind in its tower, so a pooled budget is split between the towers
(and between heads and neurons) by these relative ranks, not by absolute scores (a tower whose weights were all 3x
larger would be cut the same), and a unit's rank does not weigh its cost (a head holds as many parameters as ~128
MLP neurons at ViT-B/32). A ranking by absolute score per parameter is the alternative not built here.

``widths``: ``per_layer`` (a global ranking; every layer keeps at least one head, and ``round_to`` neurons: each
layer's neuron count is rounded to the nearest multiple of ``round_to``, its best-scored neurons kept) or
``uniform`` (every kept layer of a tower keeps the same heads count and number of MLP neurons, a multiple of
``round_to``, each layer its best-scored ones; the export is a plain open_clip model with a smaller ``mlp_ratio``
and ``layers``). ``channels``: ``keep`` (the default) leaves the residual width (and with ``uniform`` every head:
open_clip ties a tower's width to heads x head dim); ``prune`` also prunes each tower's residual channels by their
scores, in the same budget: ``per_layer`` ranks them with heads and neurons in chunks of ``round_to``; ``uniform``
moves the width by a head dim together with one head in every layer, so the export stays a plain open_clip model
with a smaller ``width`` (see :mod:`strategies.inheritance.importance_select`).

Scores are kept in the stage's folder (:attr:`compress.rundir.RunDir.importance_scores`, keyed by a SHA-256 of the
source's weights, the criterion, the number of calibration batches, their micro-batch size and the number of
processes): a restart before the first checkpoint reads them instead of scoring again, and ``scores_from`` (a scores
file of another run of the same source) re-prunes to another target without a calibration pass. Cost at ViT-B/32
(measured once by hand on 2 busy CPU cores, not by a benchmark script): hashing the source (600 MB in fp32) 1.3 s
on every process, the scores (see the scores module), a scores file of 0.25 MB, then one copy of the source
(600 MB) selected and pruned in place, 5-7 s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress import distributed
from compress.distributed import wait_for_shared_file
from compress.models.params import prunable_count
from compress.models.structure import TowerKeep, describe_structure, open_clip_config, prune_model
from compress.models.towers import get_tower, resolve_towers
from compress.plugins import Calibration, Inheritance
from compress.registry import INHERITANCE
from strategies.inheritance.auto import BUDGETS
from strategies.inheritance.importance_scores import CRITERIA, Scores, compute_scores
from strategies.inheritance.importance_select import select_units

logger = logging.getLogger(__name__)
WIDTHS = ("uniform", "per_layer")
CHANNELS = ("keep", "prune")
#: the default number of calibration micro-batches of the criteria that read data
DEFAULT_CALIBRATION = 8


@INHERITANCE.register("importance")
class ImportanceInheritance(Inheritance):
    """Importance-ranked one-shot pruning of the source (see the module): ``criterion`` magnitude | taylor |
    activation, ``widths`` uniform | per_layer, ``drop_layers`` 0 | k | {vision: k, text: k}, ``round_to``,
    ``calibration_batches`` (8 for taylor / activation; magnitude reads no data), ``scores_from`` a scores file,
    ``channels`` keep | prune (residual channels)."""

    needs_student_config = False
    identity_optional = ("channels",)
    target_parameter = "target_sparsity"
    source_bound = ("scores_from",)
    structure_decided_by = "the importance scores, before step 0"

    def __init__(
        self,
        target_sparsity: float = 0.5,
        criterion: str = "taylor",
        budget: str = "pooled",
        towers: str | list[str] = "both",
        widths: str = "per_layer",
        drop_layers: int | Mapping[str, int] = 0,
        round_to: int = 8,
        calibration_batches: int | None = None,
        scores_from: str | None = None,
        channels: str = "keep",
    ) -> None:
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if criterion == "mope":
            raise ValueError("criterion 'mope' (MoPE-CLIP's module-wise pruning error) is not built: it evaluates the "
                             "model once per removable head, neuron and layer (tens of thousands of zero-shot "
                             "evaluations at ViT-B/32); use magnitude, taylor or activation")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        if widths not in WIDTHS:
            raise ValueError(f"widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1 (1 = no rounding), got {round_to!r}")
        self.towers = resolve_towers(towers if isinstance(towers, str) else tuple(towers))
        self.drop_layers = _drop_layers(drop_layers, self.towers)
        if scores_from is not None:
            if calibration_batches is not None:
                raise ValueError("calibration_batches has no effect with scores_from (the scores are read, no "
                                 "calibration pass): leave it unset")
            scores_from = _check_scores_file(scores_from)
        if calibration_batches is None:
            calibration_batches = 0 if criterion == "magnitude" else DEFAULT_CALIBRATION
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int):
            raise ValueError(f"calibration_batches must be an integer, got {calibration_batches!r}")
        if criterion == "magnitude" and calibration_batches > 0:
            raise ValueError("calibration_batches has no effect with criterion 'magnitude' (it reads no data): "
                             "leave it unset or 0")
        if criterion != "magnitude" and calibration_batches < 1:
            raise ValueError(f"criterion {criterion!r} scores on calibration batches: calibration_batches must be "
                             f">= 1, got {calibration_batches}")
        self.target_sparsity = float(target_sparsity)
        self.criterion, self.budget, self.widths, self.round_to = criterion, budget, widths, round_to
        self.channels = channels
        self.n_calibration = int(calibration_batches)
        self.scores_from = scores_from
        self.scores: Scores | None = None
        self.layer_map: dict[str, list[int]] | None = None
        # heads and neurons have per-layer floors whichever the source: one go from the teacher bounds a chain of
        # stages, unless layers are dropped (k per stage drops more in a chain than k once)
        self.bounded_by_teacher = not any(self.drop_layers.values())

    # -- what the engine asks of it --------------------------------------------------------
    def calibration_batches(self) -> int:
        return 0 if self.scores_from is not None else self.n_calibration

    def describe_student(self, source: str) -> str:
        drop = ", ".join(f"{k} {v}" for k, v in self.drop_layers.items() if v) or "none"
        what = "neurons and residual channels" if self.channels == "prune" else "neurons"
        return (f"{source} pruned once by {self.criterion} importance ({self.widths.replace('_', '-')} widths, "
                f"layers dropped: {drop}, {what} rounded to {self.round_to})")

    def schedule_lines(self, total_steps: int) -> list[str]:
        if self.scores_from is not None:
            where = f"scores read from {self.scores_from} (no calibration pass)"
        elif self.n_calibration:
            cost = "forward + backward" if self.criterion == "taylor" else "forward"
            where = (f"calibration: {self.n_calibration} training micro-batches, one {cost} of the source each, "
                     "before step 0 (scores kept in the stage's importance/ folder; a restart reads them)")
        else:
            where = "calibration: none (weights only)"
        rule = ("every kept layer of a tower keeps all heads and the same MLP width (a plain open_clip model)"
                if self.widths == "uniform" else "heads and MLP neurons ranked globally, per-layer widths")
        if self.channels == "prune":
            rule += (f"; residual channels ranked with them, in chunks of {self.round_to}" if self.widths == "per_layer"
                     else "; the width moves by a head dim with one head per layer (heads x head dim, as open_clip)")
        return [f"importance: criterion {self.criterion}, {self.budget} budget over {'+'.join(self.towers)}; {rule}",
                f"importance {where}"]

    def check(self, student: nn.Module | None, source: nn.Module) -> None:
        """The layers to drop exist in the source (every tower keeps at least one layer), and even its smallest
        ones fit in the budget (the dry run calls it on a shape-only source)."""
        if self.channels == "prune":
            for name in self.towers:
                width = get_tower(source, name).width
                if width % self.round_to or width < 2 * self.round_to:
                    raise ValueError(f"channels: prune keeps a multiple of round_to ({self.round_to}) residual "
                                     f"channels, and the {name} tower's width {width} is no multiple of it (or "
                                     "leaves nothing to prune): set round_to to a divisor of the width")
                head_dim = describe_structure(source, (name,))[name]["head_dim"]
                if self.widths == "uniform" and head_dim % self.round_to:
                    raise ValueError(f"widths: uniform with channels: prune moves the {name} width by its head dim "
                                     f"({head_dim}, as open_clip ties width to heads x head dim), no multiple of "
                                     f"round_to ({self.round_to}): set round_to to a divisor of the head dim")
        for name, k in self.drop_layers.items():
            depth = len(get_tower(source, name).blocks)
            if k >= depth:
                raise ValueError(f"drop_layers: {k} of the {name} tower's {depth} layers (at least one stays)")
        costs = _costs(source, describe_structure(source), self.towers)
        keys = {name: "all" if self.budget == "pooled" else name for name in self.towers}
        needed: dict[str, float] = {}
        dropped: dict[str, float] = {}
        for name in self.towers:
            needed[keys[name]] = needed.get(keys[name], 0.0) + self.target_sparsity * costs[name]["total"]
            smallest = sorted(costs[name]["layers"])[: self.drop_layers[name]]
            dropped[keys[name]] = dropped.get(keys[name], 0.0) + sum(smallest)
        for key, value in dropped.items():
            if value > needed[key] + 1e-9:
                raise ValueError(f"drop_layers removes at least {value:,.0f} parameters, more than the target's "
                                 f"{needed[key]:,.0f} ({key}): drop fewer layers or raise target_sparsity")
        if self.channels == "prune":  # narrower residual streams: the bound below counts heads and neurons only
            return
        most = max_removable(describe_structure(source), costs, self.towers, self.widths, self.drop_layers,
                             self.round_to)
        totals: dict[str, float] = {}
        reach: dict[str, float] = {}
        for name in self.towers:
            totals[keys[name]] = totals.get(keys[name], 0.0) + costs[name]["total"]
            reach[keys[name]] = reach.get(keys[name], 0.0) + most[name]
        drop = ", ".join(f"{k} {v}" for k, v in self.drop_layers.items() if v) or "none"
        for key, value in reach.items():
            if needed[key] > value + 1e-9:
                what = (f"only MLP neurons (down to round_to={self.round_to} per layer) and the dropped layers "
                        f"({drop}) go" if self.widths == "uniform" else f"every layer keeps one head and "
                        f"round_to={self.round_to} neurons, the dropped layers ({drop}) go")
                other = ", or use widths: per_layer" if self.widths == "uniform" else ""
                raise ValueError(
                    f"target_sparsity {self.target_sparsity:.1%} needs {needed[key]:,.0f} parameters removed "
                    f"({key}); widths {self.widths} can remove at most {value:,.0f} ({value / totals[key]:.1%}): "
                    f"{what}. Lower the target, drop layers{other}")

    # -- scores ----------------------------------------------------------------------------
    def score_key(self, source: nn.Module, calibration: Calibration | None = None) -> dict[str, Any]:
        """What the scores depend on: the source's weights (SHA-256), the criterion, the calibration batches (their
        count, and the micro-batch size and number of processes that drew them), the towers."""
        digest = hashlib.sha256()
        for name, tensor in sorted(source.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        key = {"source": digest.hexdigest(), "criterion": self.criterion, "batches": self.n_calibration,
               "towers": list(self.towers)}
        if calibration is not None and self.n_calibration:  # magnitude reads no data: any layout has its scores
            key.update(micro_batch=calibration.micro_batch, world_size=calibration.world_size)
        return key

    def prepare(self, calibration: Calibration, source: nn.Module) -> None:
        """The scores of ``source``: from ``scores_from``, else from the stage's cache when its key matches, else
        computed (on the calibration batches) and written there by the main process. The other processes only read
        that file (strictly: missing or of another key is an error), so every rank prunes by the same scores."""
        key = self.score_key(source, calibration)
        needs = [f"{name}/channels" for name in self.towers] if self.channels == "prune" else []
        if self.scores_from is not None:
            self.scores = _read(Path(self.scores_from), key, strict=True, fields=SOURCE_FIELDS, needs=needs)
            return
        path = Path(calibration.scores_path)
        if not calibration.main:  # rank 0 wrote them a moment ago: a rank never scores on its own
            if not wait_for_shared_file(path):
                raise ValueError(f"importance: no scores file at {path} on this rank after "
                                 f"{distributed.SHARED_FILE_WAIT_S:.0f} s (rank 0 writes it there before the others "
                                 "read it): the run directory must be shared by all ranks")
            self.scores = _read(path, key, strict=True, what="the scores rank 0 wrote at", needs=needs)
            return
        self.scores = _read(path, key, strict=False, needs=needs) if path.is_file() else None
        if self.scores is not None:
            logger.info("importance: scores read from %s (no calibration pass)", path)
            return
        self.scores = compute_scores(self.criterion, source, self.towers, calibration.batches(), calibration.device)
        if calibration.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in self.scores.items()}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True)})
            tmp.replace(path)

    # -- the contract ---------------------------------------------------------------------
    def record(self, student: nn.Module) -> dict[str, Any]:
        """The default record and the source layer of each student layer (``layer_map``), which the weights do not
        say: a resumed run's structure report aligns the student with its source as an uninterrupted one's."""
        return {**super().record(student), "layer_map": self.layer_map}

    def restore(self, record: Mapping[str, Any], source: nn.Module | None) -> nn.Module | None:
        """``layer_map`` from the record; the engine rebuilds the plain student of the recorded structure."""
        layer_map = record.get("layer_map")
        self.layer_map = {k: list(v) for k, v in layer_map.items()} if layer_map is not None else None
        return None

    @torch.no_grad()
    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        if self.scores is None:
            if self.criterion != "magnitude":
                raise ValueError(f"importance ({self.criterion}) has no scores: the engine calls prepare() with "
                                 "calibration batches before inherit()")
            self.scores = compute_scores("magnitude", source, self.towers, [], torch.device("cpu"))
        model = copy.deepcopy(source).requires_grad_(True)
        self.check(None, model)
        structure = describe_structure(model)
        keep = select_units(self.scores, structure, _costs(model, structure, self.towers), self.towers,
                            self.target_sparsity, self.budget, self.widths, self.drop_layers, self.round_to,
                            channels=self.channels == "prune")
        self.layer_map = {name: list(k.layers) for name, k in keep.items() if k.layers is not None}
        student = prune_kept(model, keep)
        cfg = getattr(student, "clip_cfg", None)
        if self.widths == "uniform" and cfg is not None and open_clip_config(cfg, student.clip_structure) is None:
            shapes = {n: f"width {t['width']}, heads {sorted(set(t['heads']))}, MLP {sorted(set(t['mlp_width']))}"
                      for n, t in student.clip_structure.items()}
            raise ValueError(f"widths: uniform selected a student open_clip cannot build from a config ({shapes}); "
                             "use widths: per_layer")
        return student


def prune_kept(model: nn.Module, keep: Mapping[str, TowerKeep]) -> nn.Module:
    """``model`` (in place) keeping the given layers (the blocks not kept are removed, the config's ``layers``
    follows), then heads and neurons through :func:`compress.models.structure.prune_model`."""
    cfg = copy.deepcopy(getattr(model, "clip_cfg", None))
    plain: dict[str, TowerKeep] = {}
    for name, k in keep.items():
        if k.layers is not None:
            transformer = get_tower(model, name).transformer
            blocks = list(transformer.resblocks)
            transformer.resblocks = nn.ModuleList([blocks[j] for j in k.layers])
            transformer.layers = len(k.layers)
            if cfg is not None:
                cfg["vision_cfg" if name == "vision" else "text_cfg"]["layers"] = len(k.layers)
        plain[name] = TowerKeep(channels=k.channels, heads=k.heads, neurons=k.neurons)
    if cfg is not None:
        model.clip_cfg = cfg
    return prune_model(model, plain)


def max_removable(structure: Mapping[str, Any], costs: Mapping[str, Mapping[str, Any]], towers: tuple[str, ...],
                  widths: str, drop: Mapping[str, int], round_to: int) -> dict[str, float]:
    """The most parameters of each tower the selection can remove: a kept layer loses its MLP neurons down to
    ``min(round_to, width)`` and (``per_layer``) its heads down to one; ``drop[name]`` layers go whole (the best
    choice of them: sum of what every layer can lose, plus the k largest gains of dropping a layer instead)."""
    out = {}
    for name in towers:
        t, c = structure[name], costs[name]
        kept = [((h - min(h, 1)) * c["head"] if widths == "per_layer" else 0) + (n - min(n, round_to)) * c["neuron"]
                for h, n in zip(t["heads"], t["mlp_width"], strict=True)]
        gains = sorted((layer - k for layer, k in zip(c["layers"], kept, strict=True)), reverse=True)
        out[name] = float(sum(kept) + sum(gains[: drop.get(name, 0)]))
    return out


def _drop_layers(value: int | Mapping[str, int], towers: tuple[str, ...]) -> dict[str, int]:
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in towers]
        if unknown:
            raise ValueError(f"drop_layers names {unknown}, towers pruned: {', '.join(towers)}")
        out = {name: value.get(name, 0) for name in towers}
    else:
        out = dict.fromkeys(towers, value)
    for name, k in out.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"drop_layers must be an integer >= 0 (or {{vision: k, text: k}}), got {k!r} for {name}")
    return out


def _costs(model: nn.Module, structure: Mapping[str, Any], towers: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Parameters of a head, a neuron and each block, and the prunable total, per tower; and what they are made of
    (per kept residual channel, and what does not scale with it), for a selection that prunes channels: a channel
    costs ``channel_tower`` (its counted tower-level tensors) + per kept layer ``channel_block`` (norms, output
    biases, LayerScale) + ``head_channel`` per kept head + ``neuron_channel`` per kept neuron."""
    out = {}
    for name in towers:
        t = structure[name]
        width, d = t["width"], t["head_dim"]
        tower = get_tower(model, name)
        blocks = tower.blocks
        bias = blocks[0].attn.in_proj_bias is not None if blocks else False
        per_block = 0
        if blocks:
            b = blocks[0]
            parts = [*b.ln_1.parameters(), *b.ln_2.parameters(), b.attn.out_proj.bias, b.mlp.c_proj.bias,
                     *(getattr(getattr(b, ls), "gamma", None) for ls in ("ls_1", "ls_2"))]
            per_block = sum(p.numel() for p in parts if isinstance(p, torch.Tensor)) // max(width, 1)
        params = dict(model.named_parameters())
        per_tower = sum(params[p.key].numel() // params[p.key].shape[p.axis] for p in tower.channel_params
                        if p.counted and params[p.key].shape[p.axis])
        out[name] = {"head": 4 * d * width + (3 * d if bias else 0),
                     "neuron": 2 * width + (1 if blocks and blocks[0].mlp.c_fc.bias is not None else 0),
                     "head_channel": 4 * d, "head_bias": 3 * d if bias else 0,
                     "neuron_channel": 2, "neuron_bias": 1 if blocks and blocks[0].mlp.c_fc.bias is not None else 0,
                     "channel_tower": per_tower, "channel_block": per_block,
                     "layers": [sum(p.numel() for p in b.parameters()) for b in blocks],
                     "total": prunable_count(model, (name,))}
    return out


#: the fields of a scores key that a scores file of another run (``scores_from``) must match: its calibration
#: batches may differ (the scores are reused as they are)
SOURCE_FIELDS = ("source", "criterion", "towers")


def _check_scores_file(scores_from: str) -> str:
    """``scores_from`` as an absolute path, once it is a safetensors file whose key names a source, a criterion and
    towers (a scores file this strategy wrote); else the error naming it."""
    from safetensors import safe_open

    path = Path(scores_from).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"scores_from: no scores file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            key = json.loads((f.metadata() or {}).get("key", "{}"))
    except Exception as e:  # not a safetensors file, or its metadata not JSON
        raise ValueError(f"scores_from: {path} is not a scores file of importance inheritance ({e})") from None
    missing = [f for f in SOURCE_FIELDS if not isinstance(key, dict) or f not in key]
    if missing:
        raise ValueError(f"scores_from: {path} is not a scores file of importance inheritance (its key lacks "
                         f"{', '.join(missing)})")
    return str(path)


def _read(path: Path, key: Mapping[str, Any], strict: bool, what: str = "scores_from",
          fields: tuple[str, ...] | None = None, needs: list[str] | tuple[str, ...] = ()) -> Scores | None:
    """The scores at ``path`` if its key matches ``key`` on ``fields`` (all of ``key``'s by default) and it holds the
    entries ``needs`` (channel scores: a file written before they existed has none); ``strict``: a mismatch is an
    error, else None (the scores are computed again)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("key", "{}"))
    fields = tuple(key) if fields is None else fields
    wrong = [f for f in fields if stored.get(f) != key.get(f)]
    if wrong:
        if strict:
            raise ValueError(f"{what} {path}: its {', '.join(wrong)} differ from this stage's "
                             f"({ {f: stored.get(f) for f in wrong} } vs { {f: key.get(f) for f in wrong} })")
        return None
    scores = {k: v for k, v in load_file(str(path)).items()}
    missing = [k for k in needs if k not in scores]
    if missing:
        if strict:
            raise ValueError(f"{what} {path}: no {', '.join(missing)} scores (written before channel scores "
                             "existed): score the source again (leave scores_from unset)")
        return None
    return scores

