"""TinyCLIP's ablation sweeps (experiments/configs/ablations/) and their pages (experiments.ablations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.config import ConfigError
from compress.recipe import run_id_of
from experiments.ablations import ABLATIONS, BENCHMARKS, CONFIG_DIR, render, scale_overrides
from experiments.sweep import load_sweep

#: every (benchmark, ablation) pair
PAIRS = [(bench, name) for bench in BENCHMARKS for name in BENCHMARKS[bench].ablations]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A stand-in for the demo's trained teacher: its architecture, exported (random weights)."""
    from compress.models import load_model
    from compress.models.export import save_model

    return str(save_model(load_model("cc-demo-teacher"), tmp_path_factory.mktemp("teacher") / "model"))


def runs_of(name: str, teacher: str, *extra: str, bench: str = "shapes"):
    return load_sweep(BENCHMARKS[bench].config_dir / f"{name}.yaml", [f"teacher.model={teacher}", *extra]).runs()


@pytest.mark.parametrize(("bench", "name"), PAIRS)
def test_each_ablation_has_three_seeds_one_teacher_and_one_budget(bench, name, teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    runs = runs_of(name, teacher, bench=bench)
    seeds = sorted({r.cfg.seed for r in runs})
    assert seeds == [0, 1, 2] and len(runs) % 3 == 0
    assert {r.cfg.teacher.model for r in runs} == {teacher}
    budgets = {sum(s.steps for s in r.cfg.stages) if r.cfg.stages else r.cfg.train.steps for r in runs}
    assert budgets == ({30, 60, 120, 240} if name == "speedup" else {240})
    assert {r.cfg.train.batch_size for r in runs} == {128}
    students = {r.cfg.student.model if r.cfg.student else None for r in runs}
    assert students <= {"cc-demo-student", None}  # None: automatic inheritance at the same budget


@pytest.mark.parametrize("config_dir", [CONFIG_DIR, CONFIG_DIR / "web"], ids=["shapes", "web"])
def test_the_inheritance_ablation_prunes_to_the_manual_students_budget(config_dir):
    """auto and importance prune the teacher to the manual student's prunable parameters, in both benchmarks."""
    from compress.models import load_model
    from compress.stage import prunable_parameters

    specs = load_sweep_text("inheritance", config_dir)["zip"][0]["inheritance"]
    kept = prunable_parameters(load_model("cc-demo-student")) / prunable_parameters(load_model("cc-demo-teacher"))
    targets = {spec["name"]: spec.get("target_sparsity") for spec in specs}
    assert set(targets) == {"none", "manual", "auto", "importance"}
    for name in ("auto", "importance"):
        assert targets[name] == pytest.approx(1 - kept, abs=0.001), name


def load_sweep_text(name: str, config_dir: Path = CONFIG_DIR) -> dict:
    import yaml

    return yaml.safe_load((config_dir / f"{name}.yaml").read_text())


def test_without_the_trained_teacher_the_sweeps_are_refused():
    with pytest.raises(ConfigError, match="teacher"):
        load_sweep(CONFIG_DIR / "loss.yaml").runs()


def test_scale_multiplies_the_batch_and_the_data(teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (run, *_) = runs_of("logit_scale", teacher, *scale_overrides(4))
    assert (run.cfg.train.batch_size, run.cfg.data.train.num_samples, run.cfg.train.steps) == (512, 102400, 240)
    with pytest.raises(ValueError):
        scale_overrides(0)


def test_the_speedup_page_reports_the_factor_computed_from_the_rows(teacher, monkeypatch, tmp_path):
    """Rows written by hand for every run of the speed-up sweep: scratch reaches 40 at 240 steps, manual
    inheritance 30/50/60/70 at 30/60/120/240 steps, so it reaches 40 at 45 steps (linear): 240/45 = 5.3x."""
    monkeypatch.chdir(tmp_path)
    runs = runs_of("speedup", teacher)
    accuracy = {"none": {30: 10.0, 60: 20.0, 120: 30.0, 240: 40.0},
                "manual": {30: 30.0, 60: 50.0, 120: 60.0, 240: 70.0}}
    for run in runs:
        run.run_dir.mkdir(parents=True)
        top1 = accuracy[run.cfg.inheritance["name"]][run.cfg.train.steps] + run.cfg.seed - 1  # mean over seeds as given
        metrics = {"zs/color_shape/top1": top1, "zs/color_shape/top1_heldout": 0.0, "ret/val/i2t_r1": 0.0,
                   "ret/val/t2i_r1": 0.0, "params/vision": 1, "params/text": 1}
        row = {"run_id": run.run_id, "name": run.cfg.name, "status": "completed", "config": run.cfg.to_dict(),
               "metrics": metrics}
        (run.run_dir / "result.json").write_text(json.dumps(row))
    page = render("speedup", [r.run_dir for r in runs], tmp_path / "docs").read_text()
    assert page.startswith("# The training speed-up of inheritance")
    assert "`python -m experiments.ablations speedup --benchmark shapes`" in page
    assert "reaches it after 45 steps: a **5.3x** speed-up" in page
    assert "| none | 10 ± 1 | 20 ± 1 | 30 ± 1 | 40 ± 1 |" in page  # seeds at -1/0/+1 of the means above
    assert (tmp_path / "docs" / "speedup-steps.png").is_file()
    # pages written where --docs said: the command on the page says it too (it goes to the runs' folder without)
    page = render("speedup", [r.run_dir for r in runs], tmp_path / "docs", docs_option="docs/ablations").read_text()
    assert ("Regenerate from scratch: `python -m experiments.ablations speedup --benchmark shapes --docs "
            "docs/ablations`") in page


def write_rows(runs, top1) -> None:
    """A result row (and a short metrics.jsonl) for every run, as a real run leaves them."""
    for run in runs:
        run.run_dir.mkdir(parents=True)
        metrics = {"zs/color_shape/top1": top1(run), "zs/color_shape/top1_heldout": 10.0 + run.cfg.seed,
                   "ret/val/i2t_r1": 5.0, "ret/val/t2i_r1": 6.0, "params/vision": 400000 + 1000 * len(run.cfg.stages),
                   "params/text": 300000, "sparsity/achieved": 0.75, "train/duration_s": 50.0 + run.cfg.seed}
        row = {"run_id": run.run_id, "name": run.cfg.name, "status": "completed", "config": run.cfg.to_dict(),
               "metrics": metrics}
        (run.run_dir / "result.json").write_text(json.dumps(row))
        lines = [{"step": k, "loss": 1.0 / k, "lr": 1e-3} for k in (1, 2, 3)]
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize(("bench", "name"), [pair for pair in PAIRS if pair[1] != "speedup"])
def test_every_ablation_page_renders_its_table_and_figures(bench, name, teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    runs = runs_of(name, teacher, bench=bench)
    write_rows(runs[:-1], lambda run: 50.0 + run.cfg.seed)  # the last run has no result yet
    page = render(name, [r.run_dir for r in runs], tmp_path / "docs", benchmark=bench).read_text()
    assert f"`python -m experiments.ablations {name} --benchmark {bench}`" in page
    assert f"**1 of {len(runs)} runs have no result yet**" in page
    assert "51.0 ± 1.0" in page and "(n=2)" in page  # seeds 0/1/2 give 50/51/52; the cell missing one has 2
    for kind in ABLATIONS[name].figures:
        assert (tmp_path / "docs" / f"{name}-{kind}.png").is_file() and f"]({name}-{kind}.png)" in page


def test_the_progressive_page_has_one_row_per_number_of_stages(teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    runs = runs_of("progressive", teacher)
    write_rows(runs, lambda run: 60.0 + 10 * len(run.cfg.stages) + run.cfg.seed)
    page = render("progressive", [r.run_dir for r in runs], tmp_path / "docs").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")
            or line.startswith("| 3 ")]
    assert [r.split("|")[2].strip().strip("*") for r in rows] == ["71 ± 1", "81 ± 1", "91 ± 1"]


def test_a_speedup_already_reached_at_the_smallest_budget_is_a_lower_bound(teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    runs = runs_of("speedup", teacher)
    write_rows(runs, lambda run: (80.0 if run.cfg.inheritance["name"] == "manual" else 40.0) + run.cfg.seed)
    page = render("speedup", [r.run_dir for r in runs], tmp_path / "docs").read_text()
    assert "a speed-up of at least **8.0x**" in page  # 240 / 30: manual beats scratch's 41 at 30 steps


def test_waiting_for_runs_that_never_finish_times_out_naming_them(tmp_path):
    from experiments.ablations import wait_for

    with pytest.raises(TimeoutError, match="1 run\\(s\\) unfinished"):
        wait_for([tmp_path / "never-started"], poll_s=0.01, timeout_s=0.05)
    done = tmp_path / "done"
    done.mkdir()
    (done / "result.json").write_text(json.dumps({"run_id": "x", "name": "x", "status": "completed"}))
    wait_for([done], poll_s=0.01, timeout_s=0.05)  # returns at once


def never(*args, **kwargs):
    raise AssertionError("--render-only trained something")


@pytest.fixture
def no_training(monkeypatch):
    """Every way the command could train (the teacher, the sweeps, a dispatched run) fails the test."""
    import experiments.demo
    import experiments.dispatch
    import experiments.sweep_cli

    monkeypatch.setattr(experiments.demo, "train_teacher", never)
    monkeypatch.setattr(experiments.sweep_cli, "run_sweep", never)
    monkeypatch.setattr(experiments.dispatch, "dispatch", never)


def cache_teacher(cache, teacher: str) -> None:
    """The completed row of the demo teacher in ``cache``, as a finished training leaves it (its model: ``teacher``)."""
    from compress.run import run_dir_for
    from experiments.ablations import TEACHER_PLAN
    from experiments.demo import teacher_config

    cfg = teacher_config(TEACHER_PLAN, cache)
    run_dir_for(cfg).mkdir(parents=True)
    row = {"run_id": run_id_of(cfg), "name": cfg.name, "status": "completed", "metrics": {"export/path": teacher}}
    (run_dir_for(cfg) / "result.json").write_text(json.dumps(row))


def test_render_only_without_the_cached_teacher_trains_nothing(no_training, monkeypatch, tmp_path, capsys):
    from experiments.ablations import main

    monkeypatch.chdir(tmp_path)
    for bench in ("shapes", "both"):
        assert main(["loss", "--render-only", "--cache-dir", str(tmp_path / "cache"), "--benchmark", bench]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no trained demo teacher in" in err[0] and "--render-only" in err[0]
    assert main(["loss", "--render-only", "--cache-dir", str(tmp_path / "cache"), "--benchmark", "web"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trained web teacher in" in err[0] and "the web runs are found by it" in err[0]


def test_render_only_renders_the_runs_on_disk_next_to_them(no_training, teacher, monkeypatch, tmp_path, capsys):
    """No runs: one line naming the ablation and where its runs were looked for, nothing trained. With rows:
    the page, written next to the runs (runs/ablations/pages), not into a docs/ folder of the checkout."""
    from experiments.ablations import main

    monkeypatch.chdir(tmp_path)
    cache_teacher(tmp_path / "cache", teacher)
    cache = ["--render-only", "--cache-dir", str(tmp_path / "cache")]
    assert main(["loss", *cache, "--benchmark", "shapes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "python -m experiments.ablations: error: ablation loss (shapes): none of its 21")
    assert str(tmp_path / "runs" / "ablations") in err[0] and "`python -m experiments.ablations loss --benchmark " \
        "shapes` runs them" in err[0]
    assert main(["loss", "speedup", *cache, "--benchmark", "shapes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablations loss, speedup (shapes): none of their runs" in err[0]

    write_rows(runs_of("logit_scale", teacher), lambda run: 50.0 + run.cfg.seed)
    assert main(["logit_scale", "--render-only", "--cache-dir", str(tmp_path / "cache")]) == 0  # shapes only
    assert (tmp_path / "runs" / "ablations" / "pages" / "logit_scale.md").is_file()
    assert not (tmp_path / "docs").exists()
    assert main(["logit_scale", "--render-only", "--cache-dir", str(tmp_path / "cache"), "--docs", "docs/x"]) == 0
    assert (tmp_path / "docs" / "x" / "logit_scale.md").is_file()  # only where --docs says


def test_ctrl_c_outside_a_run_is_one_line(teacher, monkeypatch, tmp_path, capsys):
    import experiments.sweep
    from experiments.ablations import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    cache_teacher(tmp_path / "cache", teacher)
    monkeypatch.setattr(experiments.sweep, "load_sweep", interrupted)
    assert main(["loss", "--render-only", "--cache-dir", str(tmp_path / "cache")]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "python -m experiments.ablations: interrupted: the same command resumes (finished runs are kept)"]


@pytest.mark.slow
def test_ctrl_c_in_the_teacher_is_one_line_and_the_next_command_finishes_it(monkeypatch, tmp_path, capsys):
    """Ctrl-C while the shared demo teacher trains: the run's one line (no traceback), its ``interrupted``
    row; the same command then trains the teacher to completion and goes on with the sweeps."""
    import experiments.ablations
    import experiments.sweep_cli
    from compress.run import run_dir_for
    from compress.train import Trainer
    from experiments.ablations import cached_teacher, main
    from experiments.demo import DemoPlan, teacher_config

    monkeypatch.chdir(tmp_path)
    plan = DemoPlan(teacher_steps=3, student_steps=1, batch_size=8, teacher_lr=1e-3, student_lr=1e-3,
                    val_samples=16, train_samples=64)
    monkeypatch.setattr(experiments.ablations, "TEACHER_PLAN", plan)
    cache = tmp_path / "cache"
    row_path = run_dir_for(teacher_config(plan, cache)) / "result.json"
    original = Trainer.train_step

    def ctrl_c_at_step_2(self, batch, at):
        if at == 2:
            raise KeyboardInterrupt
        return original(self, batch, at)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", ctrl_c_at_step_2)
        assert main(["loss", "--cache-dir", str(cache), "--benchmark", "shapes"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        f"clip-compress: run demo-teacher interrupted (see {row_path})"]
    assert json.loads(row_path.read_text())["status"] == "interrupted"
    assert cached_teacher(cache) is None  # an interrupted teacher is not one to render with

    swept = []
    monkeypatch.setattr(experiments.sweep_cli, "run_sweep", lambda path, **kw: swept.append(kw["overrides"]) or 0)
    monkeypatch.setattr(experiments.ablations, "wait_for", lambda run_dirs: None)
    assert main(["loss", "--cache-dir", str(cache), "--benchmark", "shapes"]) == 2  # the sweep ran nothing: no rows
    row = json.loads(row_path.read_text())
    assert row["status"] == "completed" and row["metrics"]["train/steps"] == 3
    assert cached_teacher(cache) == row["metrics"]["export/path"]
    assert swept == [[f"teacher.model={row['metrics']['export/path']}"]]


# --------------------------------------------------------------------------------------
# the web-like benchmark (experiments/configs/ablations/web/)
# --------------------------------------------------------------------------------------
def test_the_demo_teacher_is_unchanged_and_the_web_teacher_is_its_own(tmp_path):
    """The demo teacher's run id is the one its cache holds (before the web plan existed); the web teacher is
    the same training on another image set (seed 100), every colour-shape pair in it, exact captions."""
    from experiments.demo import FULL, QUICK, WEB_TEACHER, teacher_config

    assert run_id_of(teacher_config(FULL, tmp_path)) == "2b0f57f6aa25"
    assert run_id_of(teacher_config(QUICK, tmp_path)) == "b2670537c87f"
    demo, web = teacher_config(FULL, tmp_path), teacher_config(WEB_TEACHER, tmp_path)
    assert (web.name, web.data.train.seed, web.data.train.options) == ("web-teacher", 100, {"cache": True,
                                                                                           "holdout": False})
    assert "caption_noise" not in web.data.train.options
    assert web.to_dict() | {"name": demo.name, "data": demo.to_dict()["data"]} == demo.to_dict()  # nothing else


def test_the_web_base_is_the_shapes_base_on_web_data():
    """The two benchmarks differ only in the students' data (noisy captions) and in the teacher passed in."""
    shapes, web = load_sweep_text("base"), load_sweep_text("web/base")
    assert web["data"]["train"]["options"] == {"cache": True, "caption_noise": "web"}
    web["data"]["train"]["options"] = shapes["data"]["train"]["options"]
    assert web | {"name": shapes["name"]} == shapes


@pytest.mark.parametrize("name", BENCHMARKS["web"].ablations)
def test_every_web_run_distils_on_noisy_captions_of_another_image_set(name, teacher, monkeypatch, tmp_path):
    """Each run of each web sweep expands and validates (its data options too, as the data set reads them):
    noisy captions without the held-out pairs on seed 0 (the web teacher's is 100), exact validation captions."""
    from compress.data.synthetic import ShapesOptions
    from compress.data.web_captions import WEB_LEVELS, CaptionNoise
    from experiments.demo import WEB_TEACHER

    monkeypatch.chdir(tmp_path)
    runs = runs_of(name, teacher, bench="web")
    assert runs and {r.run_dir.parent for r in runs} == {tmp_path / "runs" / "ablations" / "web"}
    for run in runs:
        train, val = run.cfg.data.train, run.cfg.data.val
        options = ShapesOptions.from_dict(train.options)
        assert options.caption_noise == CaptionNoise(**WEB_LEVELS) and options.holdout
        assert train.seed == 0 != WEB_TEACHER.teacher_seed
        assert ShapesOptions.from_dict(val.options).caption_noise is None and val.seed == 1


def test_the_clipkd_table_adds_each_loss_to_the_clip_loss_and_shares_the_clip_row_with_loss(teacher, monkeypatch,
                                                                                           tmp_path):
    monkeypatch.chdir(tmp_path)
    clipkd, loss = runs_of("clipkd", teacher, bench="web"), runs_of("loss", teacher, bench="web")
    rows = {tuple(spec["name"] for spec in run.cfg.losses) for run in clipkd}
    assert rows == {("clip",), ("clip", "feature_distill"), ("clip", "icl"), ("clip", "affinity"),
                    ("clip", "feature_distill", "icl")}
    crd = [r for r in clipkd if [s["name"] for s in r.cfg.losses] == ["clip", "affinity"]][0]
    assert crd.cfg.losses[1]["scale"] == "model"  # CRD: each model's own logit scale
    shared = {r.run_dir for r in clipkd} & {r.run_dir for r in loss}
    assert len(shared) == 3 and all([s["name"] for s in r.cfg.losses] == ["clip"] for r in clipkd
                                    if r.run_dir in shared)
    header = (BENCHMARKS["web"].config_dir / "clipkd.yaml").read_text()
    assert "gradient distillation (GD)" in header and "MFD" in header  # what is not built is named


def test_the_benchmark_option_selects_the_sweeps():
    from experiments.ablations import AblationsError, selected

    def names(plan):
        return [(bench.name, list(todo)) for bench, todo in plan]

    assert names(selected([], "both")) == [("shapes", list(BENCHMARKS["shapes"].ablations)),
                                           ("web", list(BENCHMARKS["web"].ablations))]
    assert names(selected(["loss", "clipkd"], "both")) == [("shapes", ["loss"]), ("web", ["loss", "clipkd"])]
    assert names(selected(["speedup"], "shapes")) == [("shapes", ["speedup"])]
    with pytest.raises(AblationsError, match=r"clipkd is a web ablation \(--benchmark web\)"):
        selected(["clipkd"], "shapes")
    with pytest.raises(AblationsError, match="known: shapes: loss"):
        selected(["nope"], "both")


def test_an_unknown_ablation_or_benchmark_is_refused_before_anything(no_training, capsys):
    from experiments.ablations import main

    for argv in (["speedup", "--benchmark", "web"], ["--benchmark", "laion"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "speedup is a shapes ablation (--benchmark shapes)" in err and "invalid choice: 'laion'" in err


def cache_web_teacher(cache, teacher: str) -> None:
    """The completed row of the web teacher in ``cache`` (its model: ``teacher``)."""
    from compress.run import run_dir_for
    from experiments.demo import WEB_TEACHER, teacher_config

    cfg = teacher_config(WEB_TEACHER, cache)
    run_dir_for(cfg).mkdir(parents=True)
    row = {"run_id": run_id_of(cfg), "name": cfg.name, "status": "completed", "metrics": {"export/path": teacher}}
    (run_dir_for(cfg) / "result.json").write_text(json.dumps(row))


@pytest.mark.slow
def test_web_pages_render_next_to_the_web_runs_or_into_docs_web(no_training, teacher, monkeypatch, tmp_path, capsys):
    """--render-only --benchmark both: the shapes page where it always was, the web page in <docs>/web (or
    runs/ablations/web/pages), each naming its own command; both teachers are found in the cache."""
    from experiments.ablations import main

    monkeypatch.chdir(tmp_path)
    cache_teacher(tmp_path / "cache", teacher)
    cache_web_teacher(tmp_path / "cache", teacher)
    write_rows(runs_of("loss", teacher), lambda run: 50.0 + run.cfg.seed)
    write_rows(runs_of("loss", teacher, bench="web"), lambda run: 40.0 + run.cfg.seed)
    args = ["loss", "--render-only", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert (tmp_path / "runs" / "ablations" / "pages" / "loss.md").is_file()
    web = (tmp_path / "runs" / "ablations" / "web" / "pages" / "loss.md").read_text()
    assert web.startswith("# The distillation loss (web-like benchmark)")
    assert "`python -m experiments.ablations loss --benchmark web`" in web and "| affinity | 41 ± 1 |" in web
    assert "On the web-like benchmark" in web and "Regenerate:" not in web
    assert main([*args, "--docs", "docs/ablations"]) == 0
    shapes = (tmp_path / "docs" / "ablations" / "loss.md").read_text()
    web = (tmp_path / "docs" / "ablations" / "web" / "loss.md").read_text()
    assert "`python -m experiments.ablations loss --benchmark shapes --docs docs/ablations`" in shapes
    assert "`python -m experiments.ablations loss --benchmark web --docs docs/ablations`" in web
    assert main(["clipkd", *args[1:]]) == 0  # its CLIP-loss row is the loss sweep's: those runs are found
    clipkd = (tmp_path / "runs" / "ablations" / "web" / "pages" / "clipkd.md").read_text()
    assert "**12 of 15 runs have no result yet**" in clipkd and "| clip | 41 ± 1 |" in clipkd
    capsys.readouterr()
    assert main(["progressive", *args[1:]]) == 2  # sweeps without rows: one line naming them, nothing trained
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablations progressive (shapes, web): none of their runs" in err[0]
    assert "`python -m experiments.ablations progressive --benchmark both` runs them" in err[0]
    assert main(["progressive", *args[1:], "--benchmark", "web"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablation progressive (web): none of its 9 runs" in err[0]
    assert "`python -m experiments.ablations progressive --benchmark web` runs them" in err[0]


def test_web_scale_reads_the_web_base(teacher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (run, *_) = runs_of("loss", teacher, *scale_overrides(2, BENCHMARKS["web"].config_dir), bench="web")
    assert (run.cfg.train.batch_size, run.cfg.data.train.num_samples) == (256, 51200)
