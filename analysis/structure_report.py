"""Report the structure a pruned model kept: a markdown table and a heat-map per tower.

Reads the structure description written with a pruned model (``structure.json`` next to
``result.json``, or the ``structure`` entry of a non-uniform export's
``clip_compress_config.json``; format in ``compress.models.structure``). A run's ``structure.json``
is relative to the model the student inherited from (the teacher: a manual student half its
teacher's size shows what it kept of it) and carries the report's title (the run and its sparsity).
No torch import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text
from compress.rundir import MODEL_DIR, NONUNIFORM_CONFIG_FILE, REPORT_FILES, STRUCTURE_FILE

#: the report's table and heat-map, next to the ``structure.json`` they are drawn from (a run directory's layout)
TABLE_FILE, HEATMAP_FILE = REPORT_FILES


def _read(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The JSON of a ``structure.json`` or an export's config (or a folder holding either), or the dict given."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        candidates = [path / STRUCTURE_FILE, path / NONUNIFORM_CONFIG_FILE, path / MODEL_DIR / NONUNIFORM_CONFIG_FILE]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no {STRUCTURE_FILE} or {NONUNIFORM_CONFIG_FILE}")
        path = found
    return json.loads(path.read_text())


def load_structure(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A structure dict from a dict, a ``structure.json``, an export's config, or a folder holding either."""
    data = _read(source)
    return dict(data.get("structure", data))


def load_title(source: Mapping[str, Any] | str | Path) -> str | None:
    """The report's title a run wrote into its ``structure.json`` (the run and its sparsity), if any."""
    title = _read(source).get("title")
    return title if isinstance(title, str) else None


def _fraction(kept: int, full: int) -> float:
    return kept / full if full else 1.0


def _by_source_layer(t: Mapping[str, Any]) -> list[tuple[int, int] | None]:
    """(heads, MLP neurons) at each layer of the reference (``full``); ``None`` where the tower kept no layer
    of it (``layers``: the reference layer of each layer, when the depths differ)."""
    full = t.get("full", t)
    layers = t.get("layers")
    if layers is None:
        return list(zip(t["heads"], t["mlp_width"], strict=True))
    out: list[tuple[int, int] | None] = [None] * len(full["heads"])
    for j, h, m in zip(layers, t["heads"], t["mlp_width"], strict=True):
        out[j] = (h, m)
    return out


def structure_table(structure: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown: per tower, kept heads and MLP neurons per layer of the reference (kept / full and percent;
    a layer the tower dropped keeps none), under ``title`` if given."""
    lines: list[str] = [f"## {title}", ""] if title else []
    for tower, t in structure.items():
        full = t.get("full", t)
        kept_heads, kept_mlp = sum(t["heads"]), sum(t["mlp_width"])
        depth = f", layers {len(t['heads'])} / {len(full['heads'])}" if "layers" in t else ""
        lines += [
            f"### {tower}: width {t['width']} / {full['width']}{depth}, heads {kept_heads} / {sum(full['heads'])}, "
            f"MLP neurons {kept_mlp} / {sum(full['mlp_width'])}",
            "",
            "| layer | heads | heads kept | MLP neurons | MLP kept |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, (kept, fh, fm) in enumerate(zip(_by_source_layer(t), full["heads"], full["mlp_width"], strict=True)):
            h, m = kept if kept is not None else (0, 0)
            note = " (layer dropped)" if kept is None else ""
            lines.append(f"| {i} | {h} / {fh}{note} | {_fraction(h, fh):.0%} | {m} / {fm} | {_fraction(m, fm):.0%} |")
        lines.append("")
    return "\n".join(lines)


def plot_structure(structure: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """A heat-map PNG of the kept fraction of heads and MLP neurons per layer of the reference, one panel
    per tower, under ``title`` (the run and its sparsity) if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = list(structure.items())
    width = max(len(t.get("full", t)["heads"]) for _, t in towers) if towers else 1
    size = (1.5 + 0.6 * width, 2.0 * max(len(towers), 1) + 0.4)
    fig, axes = plt.subplots(len(towers) or 1, 1, figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, (name, t) in zip(axes[:, 0], towers, strict=False):
        full = t.get("full", t)
        by_layer = _by_source_layer(t)
        kept = [k if k is not None else (0, 0) for k in by_layer]
        rows = [
            [_fraction(k[0], f) for k, f in zip(kept, full["heads"], strict=True)],
            [_fraction(k[1], f) for k, f in zip(kept, full["mlp_width"], strict=True)],
        ]
        image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                text = "dropped" if by_layer[c] is None else f"{value:.0%}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
        ax.set_yticks([0, 1], ["heads", "MLP"])
        ax.set_xticks(range(len(rows[0])))
        ax.set_xlabel("layer")
        depth = f", layers {len(t['heads'])} / {len(full['heads'])}" if "layers" in t else ""
        ax.set_title(f"{name} (width {t['width']} / {full['width']}{depth})", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:, 0]), label="kept fraction", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_structure_report(
    source: Mapping[str, Any] | str | Path, out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write ``structure.md`` and ``structure.png`` into ``out_dir`` (default: the folder ``source``
    names, e.g. a run directory holding ``structure.json`` next to ``result.json``), titled as the run
    wrote it there."""
    structure, title = load_structure(source), load_title(source)
    if out_dir is None:
        if isinstance(source, Mapping):
            raise ValueError("give out_dir when the structure is a dict")
        out_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TABLE_FILE, structure_table(structure, title))
    return {"table": out / TABLE_FILE, "heatmap": plot_structure(structure, out / HEATMAP_FILE, title)}
