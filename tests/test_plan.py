"""``clip-compress run CONFIG --dry-run``: the plan's numbers, the resume state it reports, and that it
writes nothing."""

from pathlib import Path

import pytest

from compress.checkpoint import config_hash, write_checkpoint
from compress.evaluation.efficiency import count_macs
from compress.models import load_model
from compress.models.params import parameter_report
from compress.plan import build_plan, format_plan
from compress.recipe import config_from_dict, run_id_of
from compress.results import write_result
from compress.run import run_dir_for
from compress.rundir import stage_dir
from experiments.cli import main


def _config(tmp_path: Path, **over) -> dict:
    data = {
        "name": "plan-test",
        "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"},
        "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "weight": 1.0, "scale": 50}, {"name": "clip", "weight": 0.25}],
        "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": 2}},
        "data": {"train": {"kind": "synthetic", "num_samples": 64}},
        "train": {"steps": 6, "batch_size": 8, "accum_steps": 2, "lr": 1e-3},
        "eval": {"zero_shot": [{"name": "color_shape", "kind": "synthetic", "task": "color_shape"}]},
        "output": {"dir": str(tmp_path / "runs")},
    }
    data.update(over)
    return data


def _two_stages(tmp_path: Path) -> dict:
    return _config(
        tmp_path,
        student=None,
        inheritance={"name": "auto", "prune_step": 2, "ramp_steps": 1},
        stages=[
            {"name": "a", "target_sparsity": 0.25},
            {"name": "b", "target_sparsity": 0.5, "steps": 4, "train": {"batch_size": 4}},
        ],
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")} if root.exists() else {}


def _facts(model) -> dict[str, int]:
    report, macs = parameter_report(model), count_macs(model)
    return {"vision": report["vision"], "text": report["text"], "token_embedding": report["token_embedding"],
            "total": report["total"], **macs}


@pytest.mark.parametrize("student", ["cc-test-student", "cc-test-rn-student"])
def test_plan_numbers_equal_the_models_built_for_real(tmp_path, student):
    """Parameters and MACs (counted on the meta device) equal parameter_report / count_macs of the models
    built with weights; samples = steps x batch; losses and weights as configured."""
    teacher = "cc-test-rn-teacher" if "rn" in student else "cc-test-teacher"
    cfg = config_from_dict(_config(tmp_path, teacher={"model": teacher, "random_init": True},
                                   student={"model": student}))
    plan = build_plan(cfg)
    (stage,) = plan.stages
    for facts, name in ((stage.student, student), (plan.teacher, teacher)):
        expected = _facts(load_model(name))
        got = {k: getattr(facts, k) for k in expected}
        assert got == expected
    assert stage.steps == 6 and stage.samples == 6 * 8 and stage.epochs == 6 * 8 / 64
    assert stage.losses == ["affinity(scale=50) x 1", "clip x 0.25"]
    assert stage.source == "teacher" and stage.state == "starts at step 0"
    text = format_plan(plan)
    assert f"vision {expected['vision'] / 1e6:.2f}M" in text
    assert "6 x batch 8 (2 micro-batches of 4) = 48 samples" in text


def test_plan_of_automatic_stages_gives_cumulative_targets_and_expected_sizes(tmp_path):
    """Stage k of an automatic chain: cumulative target q_k, per-stage target 1 - (1 - q_k) / (1 - q_{k-1}),
    and (1 - q_k) x the teacher's prunable parameters (vision + text without token embedding) + the rest."""
    cfg = config_from_dict(_two_stages(tmp_path))
    plan = build_plan(cfg)
    report = parameter_report(load_model("cc-test-teacher"))
    prunable = report["vision"] + report["text"]
    a, b = plan.stages
    assert (a.target_sparsity, b.target_sparsity) == (0.25, 0.5)
    assert a.stage_target == pytest.approx(0.25) and b.stage_target == pytest.approx(1 - 0.5 / 0.75)
    assert a.expected_prunable == round(0.75 * prunable) and b.expected_prunable == round(0.5 * prunable)
    assert b.expected_total == round(0.5 * prunable) + report["total"] - prunable
    assert a.student is None and b.source == "previous" and "stage 0 (a)" in b.source_text
    assert (b.steps, b.batch_size, b.samples) == (4, 4, 16)
    run_dir = run_dir_for(cfg)
    assert a.directory == run_dir / "stages" / "0-a" and b.directory == run_dir / "stages" / "1-b"
    text = format_plan(plan)
    assert "this stage removes 33.3% of its source" in text and "after pruning at step 2" in text


def test_dry_run_writes_nothing_and_exits_0(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_two_stages(tmp_path)))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: a" in out and "stage 1: b" in out and "starts at step 0" in out
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_dry_run_reports_the_checkpoint_it_would_resume_and_the_finished_stages(tmp_path):
    cfg = config_from_dict(_two_stages(tmp_path))
    run_dir = run_dir_for(cfg)
    stages = build_plan(cfg).stages
    write_result(stages[0].directory, {"status": "completed", "run_id": run_id_of(cfg)})
    meta = {"run_id": run_id_of(cfg), "config_sha": config_hash(cfg), "stage": 1}
    write_checkpoint(stages[1].directory, 3, load_model("cc-test-student"), {}, meta)
    before = _snapshot(run_dir)
    plan = build_plan(cfg)
    assert plan.stages[0].state.startswith("completed")
    assert plan.stages[1].state == "resumes from its checkpoint at step 3 (step-00000003)"
    assert _snapshot(run_dir) == before
    forced = build_plan(cfg, force=True)
    assert all("--force" in s.state for s in forced.stages)


def test_dry_run_reports_a_single_stage_checkpoint_and_refuses_another_runs(tmp_path):
    cfg = config_from_dict(_config(tmp_path))
    run_dir = run_dir_for(cfg)
    assert stage_dir(run_dir, None) == run_dir
    meta = {"run_id": run_id_of(cfg), "config_sha": config_hash(cfg)}
    write_checkpoint(run_dir, 5, load_model("cc-test-student"), {}, meta)
    assert build_plan(cfg).stages[0].state.startswith("resumes from its checkpoint at step 5")
    write_checkpoint(run_dir, 6, load_model("cc-test-student"), {}, {"run_id": "0123456789ab"})
    plan = build_plan(cfg)
    assert "another run or config (0123456789ab)" in plan.stages[0].state
    assert any("belongs to run 0123456789ab" in w for w in plan.warnings)


def test_dry_run_of_a_completed_run_says_it_is_skipped(tmp_path):
    cfg = config_from_dict(_config(tmp_path))
    write_result(run_dir_for(cfg), {"status": "completed", "run_id": run_id_of(cfg)})
    plan = build_plan(cfg)
    assert "would be skipped" in plan.state and plan.stages[0].state == "not run (the run is skipped)"
    assert "--force reruns" in build_plan(cfg, force=True).state


def test_dry_run_reports_a_run_directory_of_another_run(tmp_path):
    """A reused ``output.run_name`` whose folder was made for another config: the run would be refused."""
    from compress.rundir import RUN_ID_FILE

    cfg = config_from_dict(_config(tmp_path, output={"dir": str(tmp_path / "runs"), "run_name": "shared"}))
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_ID_FILE).write_text("0123456789ab\n")
    plan = build_plan(cfg)
    assert "belongs to another run (0123456789ab): the run would be refused" in plan.state
    assert plan.stages[0].state == "not run (the run is refused)"
    assert any("choose another output.run_name" in w for w in plan.warnings)


def test_missing_data_paths_are_warnings_of_a_dry_run(tmp_path, capsys):
    import yaml

    missing = tmp_path / "nowhere" / "train.csv"
    shards = str(tmp_path / "shards" / "{000..002}.tar")
    data = _config(tmp_path, data={"train": {"kind": "csv", "path": str(missing)},
                                   "val": {"kind": "webdataset", "path": shards}})
    data["eval"] = {"zero_shot": [{"name": "in", "kind": "folder", "path": str(tmp_path / "imagenet")}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    warnings = out.split("warnings:")[1]
    assert f"data.train.path: {missing} does not exist" in warnings
    assert "data.val.path: 3 of 3 shards" in warnings
    assert "eval.zero_shot[0].path" in warnings


def test_dry_run_refuses_a_tag_trained_with_the_other_activation(tmp_path, capsys):
    """``RN50@openai`` (QuickGELU weights in a GELU config) would fail when the run loads the teacher:
    the dry run fails the same way, with one line, without downloading."""
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, teacher={"model": "RN50@openai"},
                                           student={"model": "TinyCLIP-ResNet-19M-Text-19M"})))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QuickGELU" in err[0]
    with pytest.raises(Exception, match="neither a pretrained tag"):
        build_plan(config_from_dict(_config(tmp_path, teacher={"model": "ViT-B-32@no_such_tag"},
                                            student={"model": "TinyCLIP-ViT-8M-16-Text-3M"})))


def test_an_invalid_config_fails_the_dry_run(tmp_path, capsys):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, train={"steps": 0})))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_readme_shows_the_current_plan_of_the_automatic_recipe(tmp_path, monkeypatch, capsys):
    """The plan pasted in README.md is what ``--dry-run`` prints now (run id included)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    start = readme.index("  plan of tinyclip-vit-b32-auto")
    block = readme[start:readme.index("  ```", start)]
    expected = [line[2:] if line.strip() else "" for line in block.rstrip("\n").splitlines()]
    monkeypatch.chdir(tmp_path)  # output.dir "runs" is relative: a folder that does not exist
    assert main(["run", str(root / "experiments" / "configs" / "tinyclip" / "vit-b32-auto.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip("\n").splitlines() == expected


def test_a_student_with_another_tokenizer_is_refused_by_the_dry_run(tmp_path, capsys):
    """The captions are tokenized once, with the student's tokenizer: a teacher with another tokenizer
    would read token ids of the wrong vocabulary. Refused at validation (one line naming both), where only
    the context lengths were compared at run time."""
    import json

    import yaml

    from compress.models.factory import get_model_config

    cfg = get_model_config("cc-test-student")
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_tokenizer_name": "bert-base-uncased", "vocab_size": 30522}
    (tmp_path / "student.json").write_text(json.dumps(cfg))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, student={"model": str(tmp_path / "student.json")})))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenize differently" in err[0], err
    assert "teacher CLIP BPE (vocab 49408, context 16)" in err[0]
    assert "student bert-base-uncased (vocab 30522, context 16)" in err[0]
    config_from_dict(_config(tmp_path, student={"model": "cc-test-student"}))  # the same tokenizer: accepted
