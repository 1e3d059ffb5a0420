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


def _curve_runs(root: Path, configs: dict[str, dict]) -> None:
    for name, config in configs.items():
        run = root / name
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"status": "completed", "name": "lr-sweep", "config": config,
                                                     "metrics": {}}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))


def test_curves_refuse_a_group_that_pools_runs_differing_in_more_than_their_seeds(tmp_path, capsys):
    """Two learning rates of a sweep are not one group of n=4 (what ``table`` refuses too)."""
    from experiments.cli import main

    configs = {f"r{lr}-{seed}": {"name": "lr-sweep", "seed": seed, "train": {"lr": lr},
                                 "losses": [{"name": "affinity"}]} for lr in (1e-3, 3e-3) for seed in (0, 1)}
    _curve_runs(tmp_path / "runs", configs)
    curves = load_curves(tmp_path / "runs")
    with pytest.raises(AnalysisError, match=r"the runs of loss=affinity differ in train.lr: add them to --group"):
        plots.plot_curves(curves, tmp_path / "c.png", group=["loss"])
    assert _is_figure(plots.plot_curves(curves, tmp_path / "c.png", group=["loss", "lr"]))  # n=2 seeds per line
    assert _is_figure(plots.plot_curves(curves, tmp_path / "c.png"))  # a line per run pools nothing
    out = tmp_path / "cli.png"
    assert main(["plot", str(tmp_path / "runs"), "--kind", "curves", "--group", "loss", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in train.lr" in err[0] and not out.exists()
    assert main(["plot", str(tmp_path / "runs"), "--kind", "curves", "--group", "loss", "--filter",
                 "train.lr=0.001", "-o", str(out)]) == 0


def test_pareto_points_at_one_place_share_one_label(tmp_path, monkeypatch):
    import matplotlib.axes

    assert plots.shared_labels([1.0, 1.0, 2.0, 1.001], [5.0, 5.0, 6.0, 5.0], ["a", "b", "c", "d"]) == [
        (1.0, 5.0, "a\nb\nd"), (2.0, 6.0, "c")]
    rows = tmp_path / "rows.jsonl"
    metrics = [(1e6, 80.0), (1e6, 80.0), (2e6, 90.0)]
    rows.write_text("".join(json.dumps({
        "run_id": f"r{i}", "name": f"run{i}", "status": "completed",
        "config": {"seed": 0, "losses": [{"name": f"loss{i}"}]},
        "metrics": {"zs/t/top1": top1, "params/vision": params, "params/text": 0}}) + "\n"
        for i, (params, top1) in enumerate(metrics)))
    texts = []
    original = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: texts.append(text) or original(self, text, *a, **k))
    assert _is_figure(plots.plot_pareto(load_results(rows), tmp_path / "p.png", label=["loss"]))
    assert sorted(texts) == ["loss0\nloss1", "loss2"]


def test_curves_filter_and_group_by_a_setting_every_run_shares(tmp_path, capsys):
    """``--filter train.steps=3`` / ``--group train.steps`` name a setting the runs share: it is resolved against
    every config key (as ``table`` does), not only the ones that vary (was: "unknown key 'train.steps'")."""
    from experiments.cli import main

    configs = {f"r{seed}": {"name": "lr-sweep", "seed": seed, "train": {"lr": 1e-3, "steps": 3}} for seed in (0, 1)}
    _curve_runs(tmp_path / "runs", configs)
    out = tmp_path / "c.png"
    for option in (["--filter", "train.steps=3"], ["--group", "train.steps"], ["--filter", "config.train.steps=3"]):
        assert main(["plot", str(tmp_path / "runs"), "--kind", "curves", *option, "-o", str(out)]) == 0, option
        assert _is_figure(out)
    assert main(["plot", str(tmp_path / "runs"), "--kind", "curves", "--filter", "train.stepz=3", "-o", str(out)]) == 2
    assert "unknown key or metric 'train.stepz'" in capsys.readouterr().err
