"""Stages: the config forms, cumulative targets, and a staged run whose stages hand over exported models."""

import json

import pytest
import torch

from compress.config import ConfigError
from compress.config.stages import per_stage_target
from compress.models import load_model
from compress.plugins import Inheritance
from compress.recipe import resolve_stages, run_id_of, with_source_fraction
from compress.run import run_dir_for, run_experiment
from compress.stage import prunable_parameters
from tests.test_run_e2e import tiny_config

#: round_to 1: the test towers are 64 wide, too narrow for widths rounded to a multiple of 8
AUTO = {"name": "auto", "prune_step": 4, "ramp_steps": 2, "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1}


def auto_config(tmp_path, **overrides):
    base = dict(inheritance=AUTO, student=None,
                train={"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False})
    return tiny_config(tmp_path, **{**base, **overrides})


def test_chain_form_is_one_stage_per_cumulative_target(tmp_path):
    cfg = auto_config(tmp_path, stages={"targets": [0.25, 0.5, 0.75], "steps": 5})
    stages = resolve_stages(cfg)
    assert [s.name for s in stages] == ["sparsity25", "sparsity50", "sparsity75"]
    assert [s.source for s in stages] == ["teacher", "previous", "previous"]
    assert [s.cfg.train.steps for s in stages] == [5, 5, 5]
    # each strategy prunes its own source: 1 - (1 - q_k) / (1 - q_{k-1})
    assert [s.cfg.inheritance["target_sparsity"] for s in stages] == pytest.approx([0.25, 1 / 3, 0.5])
    assert [s.target_sparsity for s in stages] == [0.25, 0.5, 0.75]
    listed = auto_config(tmp_path, stages=[{"name": f"sparsity{q}", "target_sparsity": q / 100, "steps": 5}
                                           for q in (25, 50, 75)])
    assert run_id_of(listed) == run_id_of(cfg)  # the chain is shorthand for the list


def test_stage_steps_default_to_train_steps_and_keys_come_from_the_top_level(tmp_path):
    cfg = tiny_config(tmp_path, schedules={"lr": {"name": "warmup_cosine", "warmup_steps": 1},
                                           "weight/affinity": {"name": "constant"}},
                      stages=[{"student": {"model": "cc-test-student"}},
                              {"name": "again", "train": {"lr": 5e-4}, "schedules": {"lr": {"name": "constant"}},
                               "losses": [{"name": "clip"}, {"name": "affinity", "weight": 0.5}]}])
    first, second = resolve_stages(cfg)
    assert first.cfg.train.steps == second.cfg.train.steps == cfg.train.steps
    assert first.cfg.train.lr == cfg.train.lr and second.cfg.train.lr == 5e-4
    assert second.cfg.schedules["lr"] == {"name": "constant"}
    assert second.cfg.schedules["weight/affinity"] == {"name": "constant"}  # merged key by key
    assert [spec["name"] for spec in second.cfg.losses] == ["clip", "affinity"]  # replaced whole
    assert second.cfg.student.model == "cc-test-student"  # from the top level
    assert (first.name, second.name, second.source) == ("stage0", "again", "previous")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({"targets": [0.5, 0.25]}, r"stages\[1\].target_sparsity: a cumulative target must be in \(0.5, 1\)"),
        ([{"target_sparsity": 0.3, "source": "previous"}], "the first stage has no previous stage"),
        ([{"target_sparsity": 0.3}, {"target_sparsity": 0.6, "source": "elsewhere"}], "not one of teacher, previous"),
        ([{"target_sparsity": 0.3, "name": "a"}, {"target_sparsity": 0.6, "name": "a"}], "stage names must differ"),
        ([{"name": "bad name", "target_sparsity": 0.3}], "must be letters"),
        ([{"target_sparsity": 0.3, "colour": 1}], "unknown key 'stages"),
        ([{}], r"stages\[0\].target_sparsity: inheritance 'auto' prunes to a target"),
        ([{"target_sparsity": 0.3, "steps": 3, "train": {"steps": 4}}], "steps and train.steps both given"),
        ({"targets": [0.3], "every": 2}, "unknown key"),
        ([{"target_sparsity": 0.3, "steps": 2}], r"stages\[0\] \(stage0\): inheritance: .*prune_step \(4\) is after"),
    ],
)
def test_wrong_stages_are_refused_at_validation(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        auto_config(tmp_path, stages=stages)


def test_a_target_needs_a_pruning_strategy_and_the_strategy_target_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inheritance 'manual' takes no target sparsity"):
        tiny_config(tmp_path, stages=[{"target_sparsity": 0.3}])
    with pytest.raises(ConfigError, match="remove inheritance.target_sparsity"):
        auto_config(tmp_path, inheritance={**AUTO, "target_sparsity": 0.5}, stages={"targets": [0.3]})


def test_per_stage_target_follows_the_previous_stages_actual_size(tmp_path, capsys):
    (_, second) = resolve_stages(auto_config(tmp_path, stages={"targets": [0.25, 0.5]}))
    # the previous stage overshot to 40% pruned: this stage removes 1 - 0.5 / 0.6 of its source
    assert with_source_fraction(second, 0.6).inheritance["target_sparsity"] == pytest.approx(1 - 0.5 / 0.6)
    assert per_stage_target(0.5, 0.6) == pytest.approx(1 / 6)
    # already smaller than this stage's target: it prunes nothing more, and says so
    assert with_source_fraction(second, 0.4).inheritance["target_sparsity"] == 0.0
    assert "prunes nothing more" in capsys.readouterr().err


def test_a_two_stage_run_hands_the_exported_model_to_the_next_stage(tmp_path, monkeypatch):
    from strategies.inheritance.auto import AutoInheritance

    sources = []
    inherit = AutoInheritance.inherit

    def spy(self, student, source):
        sources.append({k: v.clone() for k, v in source.state_dict().items()})
        return inherit(self, student, source)

    monkeypatch.setattr(AutoInheritance, "inherit", spy)
    cfg = auto_config(tmp_path, stages={"targets": [0.25, 0.5]})
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = run_dir_for(cfg)
    rows = [json.loads((run_dir / "stages" / name / "result.json").read_text())
            for name in ("0-sparsity25", "1-sparsity50")]
    assert [r["metrics"]["stage/index"] for r in rows] == [0, 1]
    assert [r["metrics"]["stage/name"] for r in rows] == ["sparsity25", "sparsity50"]
    assert rows[1]["config"]["inheritance"]["target_sparsity"] != 0.5  # the per-stage target
    # stage 1 inherited from stage 0's exported (physically pruned) model, read back from disk
    exported = load_model(rows[0]["metrics"]["export/path"])
    teacher = load_model("cc-test-teacher")
    assert len(sources) == 2
    assert sources[0].keys() == teacher.state_dict().keys()
    assert sources[1].keys() == exported.state_dict().keys()
    assert all(torch.equal(sources[1][k], v) for k, v in exported.state_dict().items())
    assert prunable_parameters(exported) < prunable_parameters(teacher)
    # the run's row is the last stage's, and the run's model is the last stage's model
    assert row["metrics"]["export/path"] == rows[1]["metrics"]["export/path"]
    assert row["stage"] == "1-sparsity50"
    metrics = rows[1]["metrics"]
    assert metrics["sparsity/target"] == 0.5
    final = load_model(metrics["export/path"])
    assert metrics["sparsity/achieved"] == pytest.approx(1 - prunable_parameters(final) / prunable_parameters(teacher),
                                                         abs=1e-6)
    assert metrics["sparsity/stage_achieved"] == pytest.approx(
        1 - prunable_parameters(final) / prunable_parameters(exported), abs=1e-6)
    assert metrics["sparsity/stage_target"] == rows[1]["config"]["inheritance"]["target_sparsity"]
    # each stage has its own metrics series and structure report, and no checkpoint is left once it completed
    from experiments.job import write_reports

    write_reports(run_dir)
    for name in ("0-sparsity25", "1-sparsity50"):
        assert (run_dir / "stages" / name / "structure.md").is_file()
        steps = [json.loads(line)["step"] for line in (run_dir / "stages" / name / "metrics.jsonl").open()]
        assert steps == [1, 2, 3, 4, 5, 6]
        assert not (run_dir / "stages" / name / "checkpoints").exists()


def _count(model, towers):
    """Prunable parameters of ``towers`` (TinyCLIP's count)."""
    from compress.models.params import parameter_report

    return sum(parameter_report(model)[name] for name in towers)


class ExactPrune(Inheritance):
    """A test strategy that removes exactly ``target_sparsity`` of its source's prunable parameters
    (up to one MLP neuron per layer), by dropping the same share of MLP neurons in every layer, so
    that the stage engine's cumulative accounting is tested without the masks' learning dynamics
    (which need TinyCLIP's thousands of steps to settle on a target)."""

    needs_student_config = False
    needs_source = True
    target_parameter = "target_sparsity"

    def __init__(self, target_sparsity: float = 0.5, towers: str = "both", removes: float | None = None) -> None:
        self.target_sparsity = target_sparsity
        self.towers = ("vision", "text") if towers == "both" else (towers,)
        self.removes = target_sparsity if removes is None else removes  # what it really removes

    def inherit(self, student, source):
        import copy

        from compress.models.structure import TowerKeep, describe_structure, prune_model

        model = copy.deepcopy(source).requires_grad_(True)
        structure = describe_structure(model)
        mlp = sum(m * (2 * t["width"] + 1) for n, t in structure.items() if n in self.towers for m in t["mlp_width"])
        share = self.removes * _count(model, self.towers) / mlp
        keep = {
            name: TowerKeep(
                channels=torch.arange(t["width"]),
                heads=[torch.arange(h) for h in t["heads"]],
                neurons=[torch.arange(round((1 - share) * m) if name in self.towers else m) for m in t["mlp_width"]],
            )
            for name, t in structure.items()
        }
        return prune_model(model, keep)

    def regularizer(self, student, step):
        return {}

    def param_groups(self, student):
        return []

    def on_step(self, student, step):
        return None

    def log_values(self, student):
        return {}

    def export(self, student):
        return student

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_cumulative_targets_end_at_the_cumulative_sparsity(tmp_path):
    """Targets 0.25 then 0.5 of the teacher: the second stage removes a third of what its source
    kept, and the run ends at 50% pruned overall, not at 1 - 0.75 * 0.5 = 62.5%."""
    from compress.registry import INHERITANCE

    with INHERITANCE.scoped():
        INHERITANCE.register("exact_prune")(ExactPrune)
        cfg = tiny_config(tmp_path, inheritance={"name": "exact_prune"}, student=None,
                          stages={"targets": [0.25, 0.5]},
                          eval={"zero_shot": [], "retrieval": False, "throughput": False, "macs": False})
        row = run_experiment(cfg)
        run_dir = run_dir_for(cfg)
    assert row["status"] == "completed", row.get("error")
    first = json.loads((run_dir / "stages" / "0-sparsity25" / "result.json").read_text())["metrics"]
    last = row["metrics"]
    assert abs(first["sparsity/achieved"] - 0.25) <= 0.01
    assert last["sparsity/target"] == 0.5
    assert abs(last["sparsity/achieved"] - 0.5) <= 0.02, last["sparsity/achieved"]
    # the second strategy's own target was computed from the first stage's achieved size
    assert last["sparsity/stage_target"] == pytest.approx(1 - 0.5 / (1 - first["sparsity/achieved"]), abs=1e-6)
    assert last["sparsity/stage_achieved"] == pytest.approx(last["sparsity/stage_target"], abs=0.01)
    assert last["sparsity/missed"] is False


@pytest.mark.slow
def test_progressive_and_one_shot_arms_share_teacher_and_total_steps(tmp_path, monkeypatch):
    """``python -m experiments.progressive``: two stages 0 -> 0.5 -> 0.75 against one jump to 0.75,
    the same teacher and the same total steps; a miniature version runs end to end."""
    from experiments import demo, progressive

    tiny = demo.DemoPlan(teacher_steps=3, student_steps=6, batch_size=8, teacher_lr=1e-3, student_lr=1e-3,
                         val_samples=40, train_samples=64)
    monkeypatch.setattr(progressive, "QUICK", tiny)
    table = progressive.run_comparison(quick=True, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    assert list(zip(table["arm"], table["stage"], strict=True)) == [
        ("progressive", "sparsity50"), ("progressive", "sparsity75"), ("one-shot", "sparsity75")]
    assert list(table["target (cumulative)"]) == [0.5, 0.75, 0.75]
    assert table[table["arm"] == "progressive"]["steps"].sum() == table[table["arm"] == "one-shot"]["steps"].sum()
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "quick").glob("*/stages/*/result.json")]
    assert len(rows) == 3 and len({r["config"]["teacher"]["model"] for r in rows}) == 1  # one teacher
    assert (tmp_path / "results" / "quick" / "progressive_table.md").read_text().startswith("| arm")


def _exact_prune_run(tmp_path, **overrides):
    from compress.registry import INHERITANCE

    with INHERITANCE.scoped():
        INHERITANCE.register("exact_prune")(ExactPrune)
        cfg = tiny_config(tmp_path, student=None, **{
            "inheritance": {"name": "exact_prune"},
            "eval": {"zero_shot": [], "retrieval": False, "throughput": False, "macs": False}, **overrides})
        row = run_experiment(cfg)
        run_dir = run_dir_for(cfg)
    assert row["status"] == "completed", row.get("error")
    return row, run_dir


def test_one_tower_targets_are_fractions_of_that_tower(tmp_path):
    """``towers: vision``: targets 0.25 then 0.5 of the teacher's vision tower; the row counts the vision
    tower (met, not "missed"), the second stage's own target follows the first stage's vision tower,
    and the both-towers number is kept under ``sparsity/achieved_both``."""
    row, run_dir = _exact_prune_run(tmp_path, inheritance={"name": "exact_prune", "towers": "vision"},
                                    stages={"targets": [0.25, 0.5]})
    first = json.loads((run_dir / "stages" / "0-sparsity25" / "result.json").read_text())["metrics"]
    last = row["metrics"]
    teacher, final = load_model("cc-test-teacher"), load_model(last["export/path"])
    assert abs(first["sparsity/achieved"] - 0.25) <= 0.01
    assert last["sparsity/target"] == 0.5 and abs(last["sparsity/achieved"] - 0.5) <= 0.02, last
    assert last["sparsity/missed"] is False and last["sparsity/towers"] == "vision"
    assert last["sparsity/achieved"] == pytest.approx(
        1 - _count(final, ("vision",)) / _count(teacher, ("vision",)), abs=1e-6)
    assert last["sparsity/achieved_both"] == pytest.approx(
        1 - prunable_parameters(final) / prunable_parameters(teacher), abs=1e-6)
    assert last["sparsity/achieved_both"] < last["sparsity/achieved"]
    assert last["sparsity/stage_target"] == pytest.approx(1 - 0.5 / (1 - first["sparsity/achieved"]), abs=1e-6)


def test_stages_with_targets_prune_the_same_towers(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\].inheritance.towers: this stage prunes vision, stage 0"):
        auto_config(tmp_path, stages=[{"target_sparsity": 0.3},
                                      {"target_sparsity": 0.6, "inheritance": {**AUTO, "towers": "vision"}}])


def test_overshooting_the_target_is_flagged_and_warned(tmp_path, capsys):
    """A student pruned well beyond its target (50% for 25%) is "missed" too: the row says overshoot
    with the signed error, and ``run`` warns."""
    row, _ = _exact_prune_run(tmp_path, inheritance={"name": "exact_prune", "target_sparsity": 0.25, "removes": 0.5})
    m = row["metrics"]
    assert abs(m["sparsity/achieved"] - 0.5) <= 0.02
    assert m["sparsity/missed"] is True and m["sparsity/overshoot"] is True
    assert m["sparsity/error"] == pytest.approx(m["sparsity/achieved"] - 0.25, abs=1e-6)
    err = capsys.readouterr().err
    assert "overshot its sparsity target" in err and "for a target of 25.0%" in err
