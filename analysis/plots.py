"""Figures for papers (matplotlib, Agg; PNG or PDF by the file suffix; no torch import).

- :func:`plot_pareto`: a metric against parameters, MACs or throughput, one point per configuration
  (mean over seeds, std as error bars), labelled, with the Pareto front;
- :func:`plot_curves`: a logged term against the step, one line per run or the mean per group with
  a ±1 std band over seeds;
- :func:`plot_steps`: a metric against the training steps of runs that differ in ``train.steps``
  (the speed-up study), mean ± std over seeds per group;
- :func:`plot_structure`: the kept heads / MLP widths per layer of a pruned model
  (``analysis.structure_report``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.load import AnalysisError, value_text
from analysis.select import GROUP_FIX, check_cells, resolve_key
from analysis.structure_report import load_structure, load_title
from analysis.structure_report import plot_structure as _structure_figure
from analysis.tables import direction

#: axis label and divisor per metric pattern (first match wins)
UNITS: tuple[tuple[str, str, float], ...] = (
    ("params", "parameters, vision + text w/o token embedding (M)", 1e6),
    ("params/*", "parameters (M)", 1e6),
    ("macs/image", "MACs per image (G)", 1e9),
    ("macs/text", "MACs per text (G)", 1e9),
    ("throughput/*", "throughput ({unit}/s)", 1.0),
    ("zs/*/*", "zero-shot {name}, {task} (%)", 1.0),
    ("ret/*/*", "retrieval {name}, {task} (%)", 1.0),
    ("steps", "training steps", 1.0),
    ("samples_seen", "samples seen", 1.0),
    ("*time_s", "training time (s)", 1.0),
    ("*duration_s", "time (s)", 1.0),
    ("step", "step", 1.0),
)


def axis(metric: str) -> tuple[str, float]:
    """(axis label with unit, divisor) for a metric or column name."""
    parts = metric.split("/")
    for pattern, label, scale in UNITS:
        if fnmatch.fnmatchcase(metric, pattern):
            unit = parts[-1].removesuffix("_per_s")
            task = parts[1] if len(parts) > 2 else metric
            return label.format(unit=unit, task=task, name=parts[-1]), scale
    return metric, 1.0


def pareto_front(xs: Sequence[float], ys: Sequence[float], x_lower: bool = True, y_higher: bool = True) -> list[int]:
    """Indices of the points no other point dominates (at least as good in both, better in one),
    sorted by x. ``x_lower``: a smaller x is better (parameters, MACs); else larger (throughput)."""
    sx = [x if x_lower else -x for x in xs]
    sy = [-y if y_higher else y for y in ys]  # both minimised
    front = [
        i for i in range(len(sx))
        if not any(sx[j] <= sx[i] and sy[j] <= sy[i] and (sx[j] < sx[i] or sy[j] < sy[i]) for j in range(len(sx)))
    ]
    return sorted(front, key=lambda i: (xs[i], ys[i]))


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf"):
        plt.close(fig)
        raise AnalysisError(f"{path}: give a .png or .pdf file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _completed(frame: pd.DataFrame, row_kind: str = "run") -> pd.DataFrame:
    return frame[(frame["row"] == row_kind) & ~frame["failed"]]


def _label(values: Any, keys: Sequence[str]) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(value_text(v) for v in values) if keys else ""


def pareto_points(frame: pd.DataFrame, x: str, y: str, label: Sequence[str]) -> pd.DataFrame:
    """One point per ``label`` combination of the completed run rows: mean and std of x and y, runs."""
    frame = _completed(frame)
    keys = [resolve_key(frame, k) for k in label] or ["run_id"]
    x, y = resolve_key(frame, x), resolve_key(frame, y)
    frame = frame.dropna(subset=[x, y])
    if frame.empty:
        raise AnalysisError(f"no completed run has both {x} and {y}")
    check_cells(frame, keys, GROUP_FIX)
    grouped = frame.groupby(keys, dropna=False, sort=True)
    points = grouped.agg(x=(x, "mean"), y=(y, "mean"), y_std=(y, "std"), n=(y, "size")).reset_index()
    points["label"] = [_label(tuple(r[k] for k in keys), keys) for _, r in points.iterrows()]
    return points


def shared_labels(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                  tolerance: float = 0.01) -> list[tuple[float, float, str]]:
    """One label per place: points within ``tolerance`` of each axis's span of the first point of a place
    share one annotation there, their labels one per line (in the order given), instead of printing
    over each other."""
    span_x = (max(xs) - min(xs)) if xs else 0.0
    span_y = (max(ys) - min(ys)) if ys else 0.0
    places: list[tuple[float, float, list[str]]] = []
    for x, y, label in zip(xs, ys, labels, strict=True):
        for px, py, texts in places:
            if abs(x - px) <= tolerance * span_x and abs(y - py) <= tolerance * span_y:
                texts.append(label)
                break
        else:
            places.append((x, y, [label]))
    return [(x, y, "\n".join(texts)) for x, y, texts in places]


def plot_pareto(frame: pd.DataFrame, path: str | Path, x: str = "params", y: str | None = None,
                label: Sequence[str] = ("name",), title: str | None = None) -> Path:
    """``y`` (default: the first zero-shot top-1) against ``x``, points labelled by ``label`` (points at one
    place share a label, :func:`shared_labels`), the front drawn."""
    y = y or _first_metric(frame, "zs/*/top1")
    points = pareto_points(frame, x, y, label)
    x_name, x_scale = axis(resolve_key(frame, x))
    y_name, y_scale = axis(resolve_key(frame, y))
    front = pareto_front(points["x"].tolist(), points["y"].tolist(), x_lower=direction(x) != "max",
                         y_higher=direction(y) != "min")
    fig, ax = _figure(title or f"{_short(y_name)} against {_short(x_name)}")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.errorbar(points["x"] / x_scale, points["y"] / y_scale, yerr=points["y_std"].fillna(0) / y_scale, fmt="o",
                color="tab:blue", ecolor="tab:gray", capsize=3, label="configuration (mean ± std over seeds)")
    fx = points["x"].iloc[front] / x_scale
    fy = points["y"].iloc[front] / y_scale
    steps = "steps-post" if direction(x) != "max" else "steps-pre"
    ax.plot(fx, fy, "-o", color="tab:red", mfc="none", ms=11, drawstyle=steps, label="Pareto front")
    for px, py, text in shared_labels((points["x"] / x_scale).tolist(), (points["y"] / y_scale).tolist(),
                                      points["label"].tolist()):
        ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _short(label: str) -> str:
    """An axis label without its unit and qualifier, for a title."""
    return label.split(" (")[0].split(", vision")[0]


def _first_metric(frame: pd.DataFrame, pattern: str) -> str:
    found = sorted(c for c in frame.columns if fnmatch.fnmatchcase(str(c), pattern))
    if not found:
        raise AnalysisError(f"no metric matches {pattern}; name one")
    return found[0]


def plot_curves(curves: pd.DataFrame, path: str | Path, term: str = "loss", group: Sequence[str] = (),
                title: str | None = None) -> Path:
    """A logged ``term`` (``loss``, ``loss/affinity_i2t``, ``lr``, ...) against the step (from
    ``analysis.load.load_curves``): one line per run, or with ``group`` the mean per group with a
    ±1 std band over its runs, which may differ in their seeds only (else refused, naming the keys)."""
    data = curves[curves["term"] == term]
    if data.empty:
        terms = sorted(curves["term"].unique())
        raise AnalysisError(f"no logged term {term!r}; logged: {', '.join(terms[:20])}")
    keys = [resolve_key(data, k) for k in group]
    if keys:  # a group is averaged: its runs may differ in their seeds only (the check of tables)
        check_cells(data.drop_duplicates("path").drop(columns=["step", "term", "value"]), keys, GROUP_FIX)
    fig, ax = _figure(title or f"{term} during training")
    if keys:
        for value, part in data.groupby(keys, sort=True):
            stats = part.groupby("step")["value"].agg(["mean", "std", "size"]).reset_index()
            runs = part["path"].nunique()
            line, = ax.plot(stats["step"], stats["mean"], label=f"{_label(value, keys)} (n={runs})")
            ax.fill_between(stats["step"], stats["mean"] - stats["std"].fillna(0),
                            stats["mean"] + stats["std"].fillna(0), color=line.get_color(), alpha=0.2)
        legend = f"{', '.join(keys)} (mean ± std over runs)"
    else:
        for (name, seed, _), part in data.groupby(["name", "seed", "path"], sort=True, dropna=False):
            ax.plot(part["step"], part["value"], label=f"{name} (seed {value_text(seed)})")
        legend = "run"
    ax.set_xlabel("step")
    ax.set_ylabel(term)
    ax.legend(title=legend, fontsize=7, title_fontsize=8)
    return _save(fig, path)


def plot_steps(frame: pd.DataFrame, path: str | Path, y: str | None = None, x: str = "steps",
               group: Sequence[str] = ("inheritance",), title: str | None = None) -> Path:
    """``y`` (default: the first zero-shot top-1) against the training steps of runs that differ in
    their step budget, one line per ``group`` value: mean with a ±1 std band over seeds."""
    y = y or _first_metric(frame, "zs/*/top1")
    frame = _completed(frame)
    keys = [resolve_key(frame, k) for k in group]
    x, y = resolve_key(frame, x), resolve_key(frame, y)
    check_cells(frame, [*keys, x], GROUP_FIX)
    x_name, x_scale = axis(x)
    y_name, y_scale = axis(y)
    fig, ax = _figure(title or f"{_short(y_name)} against {_short(x_name)}")
    parts = frame.groupby(keys, sort=True) if keys else [((), frame)]
    for value, part in parts:
        stats = part.groupby(x)[y].agg(["mean", "std", "size"]).reset_index().sort_values(x)
        seeds = "/".join(map(str, sorted(set(stats["size"]))))
        line, = ax.plot(stats[x] / x_scale, stats["mean"] / y_scale, "o-",
                        label=f"{_label(value, keys) or y} (n={seeds})")
        std = stats["std"].fillna(0)
        ax.fill_between(stats[x] / x_scale, (stats["mean"] - std) / y_scale, (stats["mean"] + std) / y_scale,
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.legend(title=f"{', '.join(keys)} (mean ± std over seeds)" if keys else None, fontsize=7, title_fontsize=8)
    return _save(fig, path)


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first step budget at which the curve (points in order of steps, linearly interpolated)
    reaches ``target``; ``None`` if it never does. TinyCLIP's speed-up (Wu et al., ICCV 2023, Fig. 5):
    scratch's final accuracy as the target, steps(scratch) / steps_to_reach(inheritance)."""
    points = sorted(zip(steps, values, strict=True))
    for k, (s, v) in enumerate(points):
        if v >= target:
            if k == 0:
                return float(s)
            s0, v0 = points[k - 1]
            return float(s0 + (target - v0) * (s - s0) / (v - v0))
    return None


def plot_structure(source: Any, path: str | Path) -> Path:
    """The per-layer kept heads and MLP widths of a pruned model (a run folder, ``structure.json``
    or an exported model's config)."""
    try:
        structure = load_structure(source)
    except (OSError, ValueError) as error:  # missing, or not a structure JSON
        raise AnalysisError(f"{source}: {error}" if str(source) not in str(error) else str(error)) from None
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf"):
        raise AnalysisError(f"{path}: give a .png or .pdf file")
    return _structure_figure(structure, path, load_title(source))
