"""Plots: the Pareto front on cases with a known answer, the steps-to-reach interpolation, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import plots
from analysis.load import AnalysisError, load_curves, load_results

ROWS = Path(__file__).parent / "data" / "analysis_rows.jsonl"


def test_pareto_front_known_answer_fewer_parameters_better() -> None:
    xs = [2.0, 1.0, 4.0, 3.0, 0.5, 2.0, 5.0]
    ys = [60.0, 50.0, 70.0, 58.0, 40.0, 55.0, 70.0]
    # (3, 58) and (2, 55) are beaten by (2, 60); (5, 70) by (4, 70)
    assert plots.pareto_front(xs, ys) == [4, 1, 0, 2]


def test_pareto_front_known_answer_higher_throughput_better() -> None:
    xs = [100.0, 200.0, 150.0, 50.0]
    ys = [80.0, 70.0, 60.0, 85.0]
    assert plots.pareto_front(xs, ys, x_lower=False) == [3, 0, 1]  # (150, 60) is beaten by (200, 70)


def test_pareto_points_average_over_seeds() -> None:
    frame = load_results(ROWS)
    points = plots.pareto_points(frame, "params", "zs/t/top1", ["loss", "inheritance"]).set_index("label")
    assert points.loc["affinity, manual", "y"] == 82.0 and points.loc["affinity, manual", "n"] == 3
    assert points.loc["affinity, none", "y_std"] == pytest.approx(2 ** 1.5)
    assert "affinity+clip, manual" not in points.index  # failed runs have no point


def test_steps_to_reach_interpolates_linearly() -> None:
    assert plots.steps_to_reach([400, 100, 200], [80.0, 50.0, 70.0], 60.0) == 150.0
    assert plots.steps_to_reach([100, 200], [50.0, 70.0], 40.0) == 100.0
    assert plots.steps_to_reach([100, 200], [50.0, 70.0], 71.0) is None


def test_axis_labels_carry_units() -> None:
    assert plots.axis("params") == ("parameters, vision + text w/o token embedding (M)", 1e6)
    assert plots.axis("zs/imagenet/top1") == ("zero-shot top1, imagenet (%)", 1.0)
    assert plots.axis("ret/coco/i2t_r1") == ("retrieval i2t_r1, coco (%)", 1.0)
    assert plots.axis("throughput/pairs_per_s") == ("throughput (pairs/s)", 1.0)


def _is_figure(path: Path) -> bool:
    head = path.read_bytes()[:4]
    return head == (b"%PDF" if path.suffix == ".pdf" else b"\x89PNG")


def test_figures_are_written_as_png_and_pdf(tmp_path: Path) -> None:
    frame = load_results(ROWS)
    assert _is_figure(plots.plot_pareto(frame, tmp_path / "p.png", x="params", label=["loss", "inheritance"]))
    assert _is_figure(plots.plot_pareto(frame, tmp_path / "p.pdf", x="params", label=["loss", "inheritance"]))
    assert _is_figure(plots.plot_steps(frame, tmp_path / "s.png", y="zs/t/top1", x="train_time_s",
                                       group=["loss", "inheritance"]))
    with pytest.raises(AnalysisError, match="differ in losses.0.weight_i2t"):  # two losses on one line
        plots.plot_steps(frame, tmp_path / "s.png", y="zs/t/top1", x="train_time_s", group=["inheritance"])
    with pytest.raises(AnalysisError, match="give a .png or .pdf file"):
        plots.plot_pareto(frame, tmp_path / "p.svg", label=["loss", "inheritance"])


def test_curves_and_structure_figures(tmp_path: Path) -> None:
    for seed in (0, 1):
        run = tmp_path / "runs" / f"r{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": "completed", "config": {"seed": seed}, "metrics": {}}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s + seed}) + "\n"
                                                   for s in (1, 2, 4)))
    curves = load_curves(tmp_path / "runs")
    assert _is_figure(plots.plot_curves(curves, tmp_path / "c.png", term="loss"))
    assert _is_figure(plots.plot_curves(curves, tmp_path / "c.pdf", term="loss", group=["loss"]))
    with pytest.raises(AnalysisError, match="no logged term 'grad_norm'; logged: loss"):
        plots.plot_curves(curves, tmp_path / "c.png", term="grad_norm")
    tower = {"width": 8, "heads": [2, 1], "mlp_width": [16, 8], "full": {"width": 8, "heads": [2, 2],
                                                                         "mlp_width": [32, 32]}}
    (tmp_path / "runs" / "r0" / "structure.json").write_text(json.dumps({"vision": tower, "text": tower}))
    assert _is_figure(plots.plot_structure(tmp_path / "runs" / "r0", tmp_path / "structure.pdf"))
    with pytest.raises(AnalysisError, match="no structure.json"):
        plots.plot_structure(tmp_path / "runs" / "r1", tmp_path / "structure.png")
