"""Report the structure a pruned model kept: a markdown table and a heat-map per tower.

Reads the structure description written with a pruned model (``structure.json`` next to
``result.json``, or the ``structure`` entry of a non-uniform export's
``clip_compress_config.json``; format in ``compress.models.structure``). No torch import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text

STRUCTURE_FILE = "structure.json"
TABLE_FILE = "structure.md"
HEATMAP_FILE = "structure.png"
NONUNIFORM_CONFIG_FILE = "clip_compress_config.json"


def load_structure(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A structure dict from a dict, a ``structure.json``, an export's config, or a folder holding either."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        candidates = [path / STRUCTURE_FILE, path / NONUNIFORM_CONFIG_FILE, path / "model" / NONUNIFORM_CONFIG_FILE]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no {STRUCTURE_FILE} or {NONUNIFORM_CONFIG_FILE}")
        path = found
    data = json.loads(path.read_text())
    return dict(data.get("structure", data))


def _fraction(kept: int, full: int) -> float:
    return kept / full if full else 1.0


def structure_table(structure: Mapping[str, Any]) -> str:
    """Markdown: per tower, kept heads and MLP neurons per layer (kept / full and percent)."""
    lines: list[str] = []
    for tower, t in structure.items():
        full = t.get("full", t)
        heads, mlp = t["heads"], t["mlp_width"]
        kept_heads, kept_mlp = sum(heads), sum(mlp)
        lines += [
            f"### {tower}: width {t['width']} / {full['width']}, heads {kept_heads} / {sum(full['heads'])}, "
            f"MLP neurons {kept_mlp} / {sum(full['mlp_width'])}",
            "",
            "| layer | heads | heads kept | MLP neurons | MLP kept |",
            "|---:|---:|---:|---:|---:|",
        ]
        for i, (h, m, fh, fm) in enumerate(zip(heads, mlp, full["heads"], full["mlp_width"], strict=True)):
            lines.append(f"| {i} | {h} / {fh} | {_fraction(h, fh):.0%} | {m} / {fm} | {_fraction(m, fm):.0%} |")
        lines.append("")
    return "\n".join(lines)


def plot_structure(structure: Mapping[str, Any], path: str | Path) -> Path:
    """A heat-map PNG of the kept fraction of heads and MLP neurons per layer, one panel per tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = list(structure.items())
    width = max(len(t["heads"]) for _, t in towers) if towers else 1
    size = (1.5 + 0.6 * width, 2.0 * max(len(towers), 1) + 0.4)
    fig, axes = plt.subplots(len(towers) or 1, 1, figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, (name, t) in zip(axes[:, 0], towers, strict=False):
        full = t.get("full", t)
        rows = [
            [_fraction(h, f) for h, f in zip(t["heads"], full["heads"], strict=True)],
            [_fraction(m, f) for m, f in zip(t["mlp_width"], full["mlp_width"], strict=True)],
        ]
        image = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_yticks([0, 1], ["heads", "MLP"])
        ax.set_xticks(range(len(rows[0])))
        ax.set_xlabel("layer")
        ax.set_title(f"{name} (width {t['width']} / {full['width']})", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:, 0]), label="kept fraction", shrink=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_structure_report(
    source: Mapping[str, Any] | str | Path, out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write ``structure.md`` and ``structure.png`` into ``out_dir`` (default: the folder ``source``
    names, e.g. a run directory holding ``structure.json`` next to ``result.json``)."""
    structure = load_structure(source)
    if out_dir is None:
        if isinstance(source, Mapping):
            raise ValueError("give out_dir when the structure is a dict")
        out_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TABLE_FILE, structure_table(structure))
    return {"table": out / TABLE_FILE, "heatmap": plot_structure(structure, out / HEATMAP_FILE)}
