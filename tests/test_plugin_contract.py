"""What plug-ins declare and the engine asks (issue 17, point 2): the context a constructor needs, declared in one
place, and the learning rate after a strategy replaced the student, the strategy's own."""

import copy
import re

import pytest

from compress.checkpoint import CheckpointError, latest_checkpoint, student_record
from compress.config import ConfigError
from compress.masks import attach_masks, prune_masked
from compress.models import load_model
from compress.models.forward import embed_dim
from compress.plugins import CosineFrom, DistillLoss, Inheritance, Schedule
from compress.recipe import build_losses, config_from_dict
from compress.registry import INHERITANCE, LOSSES
from compress.run import run_dir_for, run_experiment
from tests.test_resume import TRAIN, Stop, assert_same, outcome, stop_at
from tests.test_run_e2e import tiny_config
from tests.test_train import make_trainer


class Swaps(Inheritance):
    """Replaces the student by a copy of itself at step 2 (as a pruning strategy would)."""

    def __init__(self, after=None):
        self.after = after

    def on_step(self, student, step):
        return copy.deepcopy(student) if step == 2 else None

    def replaces_at(self, student, step):
        return step == 2

    def schedule_after_replacement(self, lr_schedule, lr, step, total_steps):
        if self.after is None:
            return super().schedule_after_replacement(lr_schedule, lr, step, total_steps)
        return self.after(lr_schedule, lr, step)


class Fixed(Schedule):
    def __init__(self, configured, lr, step):
        self.lr, self.step = lr, step

    def value(self, step):
        return 0.25 * self.lr


@pytest.fixture(scope="module")
def models():
    return load_model("cc-test-teacher"), load_model("cc-test-student")


def lrs(trainer):
    seen = []
    trainer.on_log = lambda record: seen.append((record["step"], record["lr"]))
    trainer.fit()
    return dict(seen)


def test_by_default_the_lr_follows_tinyclips_cosine_after_a_replacement_as_before_strategies_named_it(models):
    """The trainer applied TinyCLIP's policy to every strategy that replaced the student (a cosine from the lr at the
    replacement to 0 at the last step, no new warm-up): the contract's default keeps it, and a resumed trainer
    follows it, from a checkpoint of before issue 17 too (its key was ``cosine_from``)."""
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=4, inheritance=Swaps(), log_every=1)
    assert lrs(trainer) == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: pytest.approx(5e-4)}  # lr_schedule(3) at logged step 4
    assert trainer.replaced_at == [2] and trainer.state_dict()["replaced_lr"] == [1e-3, 2]
    assert isinstance(trainer.lr_schedule, CosineFrom)
    state = trainer.state_dict()
    old = {("cosine_from" if k == "replaced_lr" else k): v for k, v in state.items()}
    for saved in (state, old):
        resumed = make_trainer(teacher, copy.deepcopy(trainer.student), steps=4, inheritance=Swaps())
        resumed.load_state_dict(saved)
        assert resumed.lr_schedule(3) == pytest.approx(5e-4) and resumed.lr_schedule(4) == pytest.approx(0.0)


def test_a_strategy_may_let_the_configured_lr_go_on_after_its_replacement(models):
    teacher, student = models
    keeps = Swaps(lambda configured, lr, step: configured)
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=4, inheritance=keeps, log_every=1)
    assert lrs(trainer) == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3}


def test_the_strategy_names_the_lr_after_its_replacement_and_a_resumed_trainer_follows_it(models):
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=4, inheritance=Swaps(Fixed), log_every=1)
    assert lrs(trainer) == {1: 1e-3, 2: 1e-3, 3: 2.5e-4, 4: 2.5e-4}
    resumed = make_trainer(teacher, copy.deepcopy(trainer.student), steps=4, inheritance=Swaps(Fixed))
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.lr_schedule(3) == 2.5e-4


def config(loss):
    return {"name": "c", "teacher": {"model": "cc-test-teacher", "random_init": True},
            "student": {"model": "cc-test-student"}, "losses": [{"name": loss}]}


def test_a_declared_context_the_engine_does_not_supply_or_the_constructor_does_not_take_is_refused():
    with LOSSES.scoped():

        @LOSSES.register("wants_width")
        class WantsWidth(DistillLoss):
            context = ("student_width",)

            def __init__(self, student_width: int | None = None) -> None:
                super().__init__()

        @LOSSES.register("declares_only")
        class DeclaresOnly(DistillLoss):
            context = ("student_embed_dim",)

        with pytest.raises(ConfigError, match="losses\\[0\\]: losses 'wants_width' declares context 'student_width', "
                                              "which the engine does not supply"):
            config_from_dict(config("wants_width"))
        with pytest.raises(ConfigError, match="'declares_only' declares context 'student_embed_dim', but its "
                                              "constructor takes no such parameter"):
            config_from_dict(config("declares_only"))


def test_only_a_declared_context_reaches_the_constructor(models):
    """A loss names the model-derived values it needs in one place (its ``context``)."""
    teacher, student = models
    with LOSSES.scoped():

        @LOSSES.register("declared")
        class Declared(DistillLoss):
            context = ("student_embed_dim", "teacher_embed_dim")

            def __init__(self, student_embed_dim: int | None = None, teacher_embed_dim: int | None = None) -> None:
                super().__init__()
                self.dims = (student_embed_dim, teacher_embed_dim)

        cfg = config_from_dict(config("declared"))
        (declared,) = (term.module for term in build_losses(cfg, student, teacher))
    assert declared.dims == (embed_dim(student), embed_dim(teacher))


def test_a_constructor_taking_an_engine_value_it_does_not_declare_is_refused_before_anything_runs():
    """Before declarations the engine passed its values by parameter name: such a plug-in, undeclared, would
    silently get None (and another run id); it is refused with the line that fixes it."""
    with LOSSES.scoped(), INHERITANCE.scoped():

        @LOSSES.register("undeclared")
        class Undeclared(DistillLoss):
            context = ("teacher_embed_dim",)

            def __init__(self, student_embed_dim: int | None = None, teacher_embed_dim: int | None = None) -> None:
                super().__init__()

        @INHERITANCE.register("counts_steps")
        class CountsSteps(Inheritance):
            def __init__(self, total_steps: int | None = None) -> None:
                self.total_steps = total_steps

        with pytest.raises(ConfigError, match=re.escape(
                "losses[0]: losses 'undeclared' takes student_embed_dim, which the engine supplies only to a plug-in "
                "that declares it: add context = ('teacher_embed_dim', 'student_embed_dim') to its class")):
            config_from_dict(config("undeclared"))
        with pytest.raises(ConfigError, match=re.escape(
                "inheritance: inheritance 'counts_steps' takes total_steps, which the engine supplies only to a "
                "plug-in that declares it: add context = ('total_steps',) to its class")):
            config_from_dict({**config("clip"), "inheritance": {"name": "counts_steps"}})
        CountsSteps.context = ("total_steps",)
        assert config_from_dict({**config("clip"), "inheritance": {"name": "counts_steps"}})


class Prunes(Inheritance):
    """Takes a target sparsity but, written before issue 17, does not declare it."""

    needs_student_config = False

    def __init__(self, target_sparsity: float = 0.5) -> None:
        self.target_sparsity = target_sparsity


def test_a_strategy_taking_target_sparsity_without_declaring_its_target_parameter_is_refused():
    """The engine reads a target only through ``target_parameter``: undeclared, a run would silently lose
    ``sparsity/target``, ``sparsity/missed`` and the plan's target line (a staged run: its per-stage target)."""
    message = ("inheritance 'prunes' takes target_sparsity, but its class declares no target_parameter, so the "
               "engine would not read its target: add target_parameter = 'target_sparsity' to its class")
    single = {**config("clip"), "student": None, "inheritance": {"name": "prunes", "target_sparsity": 0.3}}
    staged = {**single, "inheritance": {"name": "prunes"}, "stages": {"targets": [0.25, 0.5]}}
    with INHERITANCE.scoped():
        INHERITANCE.register("prunes")(Prunes)
        with pytest.raises(ConfigError, match=re.escape(f"inheritance: {message}")):
            config_from_dict(single)
        with pytest.raises(ConfigError, match=re.escape(f"stages[0].inheritance: {message}")):
            config_from_dict(staged)
        Prunes.target_parameter = "target_sparsity"
        try:
            assert config_from_dict(single) and config_from_dict(staged)
        finally:
            del Prunes.target_parameter


class MaskedKeep(Inheritance):
    """A third-party strategy: the source with masks attached (:mod:`compress.masks`), kept masked; it names
    neither a record nor a restore."""

    needs_student_config = False

    def inherit(self, student, source):
        model = copy.deepcopy(source).requires_grad_(True)
        attach_masks(model)
        return model

    def export(self, student):
        return prune_masked(student)


@pytest.mark.slow
def test_a_masked_student_of_a_third_party_strategy_resumes_exactly(tmp_path, monkeypatch):
    """The default record says ``masked`` while masks are attached, and the engine then rebuilds the student
    through the strategy's ``inherit`` (as before issue 17), so the checkpoint's mask weights load strictly."""
    with INHERITANCE.scoped():
        INHERITANCE.register("masked_keep")(MaskedKeep)
        configs = {out: tiny_config(tmp_path, inheritance={"name": "masked_keep"}, student=None, train=TRAIN,
                                    output={"dir": str(tmp_path / out)}) for out in ("straight", "stopped")}
        assert run_experiment(configs["straight"])["status"] == "completed"
        with monkeypatch.context() as patch:
            stop_at(patch, None, 3)
            with pytest.raises(Stop):
                run_experiment(configs["stopped"])
        checkpoint = latest_checkpoint(run_dir_for(configs["stopped"]))
        assert checkpoint.student_record()["masked"] is True
        row = run_experiment(configs["stopped"])
        assert row["status"] == "completed", row.get("error")
        assert_same(outcome(run_dir_for(configs["stopped"])), outcome(run_dir_for(configs["straight"])))


def test_a_strategy_record_using_the_engines_keys_is_refused(models):
    _, student = models
    assert student_record(student, {"masked": True})["masked"] is True
    with pytest.raises(CheckpointError, match=re.escape("the inheritance strategy's record uses the engine's key(s) "
                                                        "['converted', 'structure']; rename them")):
        student_record(student, {"structure": {}, "converted": False, "own": 1})


def test_an_undeclared_engine_value_the_config_sets_itself_is_accepted_and_reaches_the_constructor():
    """The engine never overrode a value the config writes: such a plug-in computes the same as before
    declarations existed, so it is not refused (only one that would silently lose the engine's value is)."""
    seen = {}
    with LOSSES.scoped(), INHERITANCE.scoped():

        @LOSSES.register("explicit_dim")
        class ExplicitDim(DistillLoss):
            def __init__(self, student_embed_dim: int = 8) -> None:
                super().__init__()
                seen["student_embed_dim"] = student_embed_dim

        @INHERITANCE.register("explicit_steps")
        class ExplicitSteps(Inheritance):
            def __init__(self, total_steps: int = 10) -> None:
                seen["total_steps"] = total_steps

        config_from_dict({**config("explicit_dim"), "losses": [{"name": "explicit_dim", "student_embed_dim": 16}]})
        assert seen["student_embed_dim"] == 16
        config_from_dict({**config("clip"), "inheritance": {"name": "explicit_steps", "total_steps": 5}})
        assert seen["total_steps"] == 5
        with pytest.raises(ConfigError, match="takes total_steps, which the engine supplies only to a plug-in"):
            config_from_dict({**config("clip"), "inheritance": {"name": "explicit_steps"}})
