"""The model card (``README.md`` of a Hub folder) written from the run: teacher, data, recipe, steps (a staged
run's summed over its stages, each stage listed), parameters, MACs, the evaluation tables of its ``result.json``
and of its task-list evaluations (:mod:`compress.export.run_facts`), in the Hugging Face model card format
(YAML front matter with ``library_name: open_clip``, as ``open_clip.push_to_hf_hub`` writes it)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compress.export.onnx_export import OnnxFile
from compress.export.run_facts import TaskListEval
from compress.export.source import ExportSource

#: result.json metric prefixes of the evaluation tables, with their titles
EVAL_TABLES = {"zs": "Zero-shot classification (%)", "ret": "Retrieval (%)"}
PARAM_KEYS = ("vision", "text", "token_embedding", "total")


@dataclass
class CardFacts:
    """What a card says. ``params``: the student's own counts (:func:`compress.models.params.parameter_report`);
    ``stored_params``: the counts of the weights in the folder, where they differ (a padded student); ``macs``:
    per image and per text; ``structure``: per-tower heads and MLP widths of a non-uniform student; ``stages``:
    each stage's folder name and row (a staged run); ``task_evals``: the run's task-list evaluations."""

    title: str
    source: ExportSource
    params: dict[str, int]
    macs: dict[str, int]
    preprocess: dict[str, Any]
    tokenizer: str
    stored_params: dict[str, int] | None = None
    structure: dict[str, Any] | None = None
    onnx: Sequence[OnnxFile] = field(default_factory=list)
    stages: Sequence[tuple[str, Mapping[str, Any]]] = field(default_factory=list)
    task_evals: Sequence[TaskListEval] = field(default_factory=list)


def _millions(n: int | float) -> str:
    return f"{n / 1e6:.2f}M"


def _count(n: int | float) -> str:
    """``4.41G`` / ``2.14M``."""
    return f"{n / 1e9:.2f}G" if n >= 1e9 else _millions(n)


def _spec(d: Mapping[str, Any] | None, skip: tuple[str, ...] = ("name",)) -> str:
    """``name(key=value, ...)`` of a plug-in spec."""
    if not d:
        return "none"
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in d.items() if k not in skip and v is not None)
    return f"{d.get('name', '?')}({args})" if args else str(d.get("name", "?"))


def _model_spec(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "(the inheritance source, pruned)"
    text = str(d.get("model"))
    if d.get("pretrained"):
        text += f" (pretrained: {d['pretrained']})"
    if d.get("random_init"):
        text += " (random initialisation)"
    return text


def _dataset(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "none"
    where = d.get("path") or ("the embedded synthetic shapes set" if d.get("kind") == "synthetic" else "")
    count = f", {d['num_samples']} samples" if d.get("num_samples") else ""
    return f"{d.get('kind')}: {where}{count}"


def batch_text(train: Mapping[str, Any]) -> str:
    """``global batch B (A micro-batches per step)``: ``train.batch_size`` is the global batch of one optimizer
    step, split into ``train.accum_steps`` micro-batches (gradient accumulation)."""
    accum = int(train.get("accum_steps") or 1)
    return f"global batch {train.get('batch_size')}" + (f" ({accum} micro-batches per step)" if accum > 1 else "")


def _sparsity(metrics: Mapping[str, Any]) -> str | None:
    if "sparsity/achieved" not in metrics:
        return None
    target = metrics.get("sparsity/target")
    return (f"{metrics['sparsity/achieved']:.1%} of the teacher's prunable parameters removed"
            + (f" (target {target:.1%})" if target is not None else ""))


def _steps_lines(row: Mapping[str, Any], stages: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """The steps line: a run's steps, batch and samples seen; a staged run's summed over its stages (each stage's
    own row: only the last stage's is the run's), one line per stage."""
    cfg, metrics = row.get("config") or {}, row.get("metrics") or {}
    train = cfg.get("train") or {}
    precision = f"precision {metrics.get('train/precision', '?')}"
    if not stages:
        return [f"- **Steps:** {metrics.get('train/steps', train.get('steps'))} of {batch_text(train)}, lr "
                f"{train.get('lr')}, {metrics.get('data/samples_seen', '?')} samples seen, {precision}"]
    steps, seen, lines = [], [], []
    for name, stage in stages:
        m, t = stage.get("metrics") or {}, (stage.get("config") or {}).get("train") or {}
        steps.append(m.get("train/steps", t.get("steps")))
        seen.append(m.get("data/samples_seen"))
        sparsity = _sparsity(m)
        lines.append(f"  - stage {name}: {steps[-1]} steps of {batch_text(t)}, lr {t.get('lr')}, "
                     f"{seen[-1] if seen[-1] is not None else '?'} samples seen"
                     + (f"; sparsity {sparsity}" if sparsity else ""))

    def total(values: list[Any]) -> Any:
        return sum(values) if all(isinstance(v, int | float) for v in values) else "?"

    return [f"- **Steps:** {total(steps)} over {len(stages)} stages, {total(seen)} samples seen, {precision}",
            *lines]


def training_lines(row: Mapping[str, Any], stages: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> list[str]:
    """Teacher, student, recipe, data and steps of a run's result row (its resolved ``config``); ``stages``: each
    stage's folder name and row, for a staged run (:func:`compress.export.run_facts.stage_rows`)."""
    cfg, metrics = row.get("config") or {}, row.get("metrics") or {}
    teachers = [cfg.get("teacher"), *(cfg.get("teachers") or [])]
    lines = [
        f"- **Teacher:** {', '.join(_model_spec(t) for t in teachers if t)}",
        f"- **Student:** {_model_spec(cfg.get('student'))}",
        f"- **Inheritance:** {_spec(cfg.get('inheritance'))}",
        f"- **Losses:** {', '.join(_spec(x) for x in cfg.get('losses') or []) or 'none'}",
        f"- **Schedules:** {', '.join(f'{k}: {_spec(v)}' for k, v in (cfg.get('schedules') or {}).items()) or 'none'}",
        f"- **Training data:** {_dataset((cfg.get('data') or {}).get('train'))}",
        *_steps_lines(row, stages),
    ]
    if not stages:  # stages without their rows: the config's stage specs
        lines += [f"  - stage {stage.get('name')}: {json.dumps(stage, sort_keys=True)}" for stage in
                  cfg.get("stages") or []]
    sparsity = _sparsity(metrics)
    if sparsity:
        lines.append(f"- **Sparsity:** {sparsity}")
    versions = row.get("versions") or {}
    lines.append(f"- **Run:** {row.get('name')} ({row.get('run_id')}), {row.get('started_at')}, "
                 f"{row.get('duration_s')} s; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def task_list_tables(evals: Sequence[TaskListEval]) -> list[str]:
    """One table per task-list evaluation of the run: each task's main metric (percent of DataComp's fraction)
    and the mean over the tasks scored (of the list's, when some were skipped or have no value)."""
    out: list[str] = []
    for ev in evals:
        out += [f"### Task list `{ev.name}`", "", "| task | data set | main metric | % |", "|---|---|---|---:|"]
        out += [f"| {t.key} | {t.dataset} | {t.metric or '?'} | {_percent(t.value)} |" for t in ev.tasks]
        of = f" of {ev.in_list}" if ev.in_list != ev.scored else ""
        out += [f"| mean over the {ev.scored} tasks scored{of} |  |  | {_percent(ev.mean)} |", ""]
    return out


def evaluation_tables(metrics: Mapping[str, Any]) -> list[str]:
    """One markdown table per kind (zero-shot, retrieval): a row per task, a column per metric, from
    ``result.json``'s ``zs/<task>/<metric>`` and ``ret/<task>/<metric>`` keys (percent)."""
    out: list[str] = []
    for prefix, title in EVAL_TABLES.items():
        rows: dict[str, dict[str, float]] = {}
        columns: list[str] = []
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != prefix or not isinstance(value, int | float):
                continue
            rows.setdefault(parts[1], {})[parts[2]] = float(value)
            if parts[2] not in columns:
                columns.append(parts[2])
        if not rows:
            continue
        out += [f"### {title}", "", "| task | " + " | ".join(columns) + " |",
                "|---|" + "---:|" * len(columns)]
        for task, values in rows.items():
            cells = [f"{values[c]:.2f}" if c in values else "" for c in columns]
            out.append(f"| {task} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _structure_lines(structure: Mapping[str, Any]) -> list[str]:
    lines = ["| tower | width | heads per layer | MLP neurons per layer |", "|---|---:|---|---|"]
    for name, t in structure.items():
        lines.append(f"| {name} | {t['width']} | {', '.join(map(str, t['heads']))} | "
                     f"{', '.join(map(str, t['mlp_width']))} |")
    return lines


def _usage(facts: CardFacts) -> list[str]:
    lines = ["```python", "import open_clip", "",
             "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH')  # or 'hf-hub:ORG/REPO'",
             "tokenizer = open_clip.get_tokenizer('local-dir:PATH')", "```"]
    if facts.onnx:
        lines += ["", "ONNX (one file per tower, run with ONNX Runtime; inputs already preprocessed / tokenized as "
                  "above; outputs L2-normalised unless the file's metadata says `clip_compress.normalized: false`):",
                  "", "| file | input | output | batch | size |", "|---|---|---|---|---:|"]
        for f in facts.onnx:
            batch = "dynamic" if f.batch_size is None else f.batch_size
            lines.append(f"| {f.path.name} | {f.input_name} | {f.output_name} | {batch} | {f.bytes / 1e6:.1f} MB |")
    return lines


def render_card(facts: CardFacts) -> str:
    """The card's markdown (see the module docstring)."""
    p, row = facts.params, facts.source.row
    lines = ["---", "tags:", "- clip", "- clip-compress", "- knowledge-distillation", "library_name: open_clip",
             "pipeline_tag: zero-shot-image-classification", "---", f"# {facts.title}", "",
             "A compressed CLIP model written by clip-compress (distillation and weight inheritance, TinyCLIP: "
             "Wu et al., ICCV 2023). Set a license before publishing: it follows the teacher's and the data's.", "",
             "## Model details", ""]
    lines += training_lines(row, facts.stages) if row else [f"- **Source:** {facts.source.model} (not a run directory: "
                                             "no training facts)"]
    lines += [
        f"- **Parameters:** image tower {_millions(p['vision'])}, text tower {_millions(p['text'])} (without its "
        f"token embedding, {_millions(p['token_embedding'])}), total {_millions(p['total'])}",
        f"- **MACs:** {_count(facts.macs['image'])} per image, {_count(facts.macs['text'])} per text",
        f"- **Image preprocessing:** {json.dumps(facts.preprocess)}",
        f"- **Tokenizer:** {facts.tokenizer}",
    ]
    if facts.stored_params is not None and facts.structure:
        lines += ["", "## Non-uniform student", "",
                  "Its layers keep different numbers of heads and MLP neurons. open_clip builds only uniform models, "
                  "so the weights in this folder are padded with zero heads and zero MLP neurons to a uniform model "
                  "computing the same function (clip-compress `pad_to_uniform`): "
                  f"{_millions(facts.stored_params['total'])} parameters stored, "
                  f"{_millions(p['total'])} in the compact form (the ONNX files and clip-compress's own format hold "
                  "the compact one; the MACs above are the compact model's).", ""]
        lines += _structure_lines(facts.structure)
    tables = [*(evaluation_tables(row["metrics"]) if row and row.get("metrics") else []),
              *task_list_tables(facts.task_evals)]
    if tables:
        lines += ["", "## Evaluation", "", *tables]
    lines += ["", "## Usage", "", *_usage(facts), ""]
    return "\n".join(lines)
