import pytest

from compress.registry import LOSSES, SCHEDULES, Registry, RegistryError


def test_register_lookup_and_description():
    reg: Registry = Registry("widgets")

    @reg.register("knob")
    class Knob:
        """Turns things.

        More text."""

        def __init__(self, turns: int, label: str = "k") -> None:
            self.turns, self.label = turns, label

    assert reg.get("knob") is Knob
    (entry,) = [e for e in reg.entries() if e.name == "knob"]
    assert entry.description == "Turns things."
    built = reg.build({"name": "knob", "turns": 3})
    assert (built.turns, built.label) == (3, "k")


def test_decorator_without_name_uses_class_name():
    reg: Registry = Registry("widgets")

    @reg.register
    class Lever:
        pass

    assert "Lever" in reg.names()


def test_duplicate_name_raises():
    reg: Registry = Registry("widgets")
    reg.register("a")(lambda: 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(lambda: 2)


def test_unknown_name_suggests_close_matches_and_lists_known():
    reg: Registry = Registry("widgets")
    for name in ("affinity", "clip", "feature_distill"):
        reg.register(name)(lambda: None)
    with pytest.raises(RegistryError) as e:
        reg.get("afinity")
    msg = str(e.value)
    assert "Did you mean 'affinity'" in msg
    assert "clip" in msg and "feature_distill" in msg


def test_build_checks_params_against_signature():
    reg: Registry = Registry("widgets")

    @reg.register("knob")
    def make_knob(turns: int, label: str = "k"):
        return (turns, label)

    with pytest.raises(RegistryError, match="has no parameter 'lable'.*Did you mean 'label'"):
        reg.build({"name": "knob", "turns": 1, "lable": "x"})
    with pytest.raises(RegistryError, match="needs parameter.*'turns'"):
        reg.build("knob")
    with pytest.raises(RegistryError, match="needs a 'name'"):
        reg.build({"turns": 1})


def test_context_reaches_only_declared_params():
    reg: Registry = Registry("widgets")

    @reg.register("a")
    def a(base_value: float):
        return base_value

    @reg.register("b")
    def b(value: float = 2.0):
        return value

    assert reg.build("a", context={"base_value": 1.5, "total_steps": 9}) == 1.5
    assert reg.build("b", context={"base_value": 1.5}) == 2.0
    # a value in the spec wins over the engine's context
    assert reg.build({"name": "a", "base_value": 3.0}, context={"base_value": 1.5}) == 3.0


def test_scoped_registration_is_undone():
    with LOSSES.scoped():
        LOSSES.register("temporary_loss")(lambda: None)
        assert "temporary_loss" in LOSSES
    assert "temporary_loss" not in LOSSES


def test_builtins_load_lazily_and_have_descriptions():
    from compress.registry import REGISTRIES

    for reg in REGISTRIES.values():
        assert reg.names()
        assert all(e.description for e in reg.entries()), [e.name for e in reg.entries() if not e.description]
    assert {"warmup_cosine", "linear_ramp", "constant"} <= set(SCHEDULES.names())
    assert {"affinity", "clip"} <= set(LOSSES.names())


def test_entry_point_plugins_are_loaded(monkeypatch):
    import compress.registry as registry

    class FakeEntryPoint:
        def load(self):
            def register():
                LOSSES.register("third_party_loss")(lambda: None)

            return register

    with LOSSES.scoped():
        monkeypatch.setattr(registry, "_plugins_loaded", False)
        monkeypatch.setattr(
            registry, "entry_points", lambda group: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else []
        )
        assert "third_party_loss" in LOSSES.names()


def test_class_without_own_init_takes_no_params_and_no_context():
    import torch

    reg: Registry = Registry("widgets")

    @reg.register("plain")
    class Plain(torch.nn.Module):
        """No parameters."""

    assert isinstance(reg.build("plain", context={"student_embed_dim": 8}), Plain)
    with pytest.raises(RegistryError, match="has no parameter 'x'"):
        reg.build({"name": "plain", "x": 1})


def test_validate_turns_constructor_value_errors_into_registry_errors():
    reg: Registry = Registry("widgets")

    @reg.register("ratio")
    class Ratio:
        def __init__(self, value: float = 0.5, total_steps: int | None = None) -> None:
            if not 0 <= value <= 1:
                raise ValueError(f"value must be in [0, 1], got {value}")
            self.value, self.total_steps = value, total_steps

    with pytest.raises(RegistryError, match=r"widgets 'ratio': value must be in \[0, 1\], got 1.5"):
        reg.validate({"name": "ratio", "value": 1.5})
    with pytest.raises(RegistryError, match="has no parameter 'valeu'"):
        reg.validate({"name": "ratio", "valeu": 1.5})
    built = reg.validate({"name": "ratio", "value": 0.25}, context={"total_steps": 7})
    assert (built.value, built.total_steps) == (0.25, 7)


def test_resolved_fills_defaults_except_engine_context():
    reg: Registry = Registry("widgets")

    @reg.register("sched")
    def sched(base_value: float = 1.0, warmup: int = 0, floor: float = 0.0):
        return None

    assert reg.resolved("sched") == {"name": "sched", "base_value": 1.0, "warmup": 0, "floor": 0.0}
    assert reg.resolved({"name": "sched", "warmup": 5}, context=("base_value",)) == {
        "name": "sched", "warmup": 5, "floor": 0.0}
    # a value written in the spec is kept, also for a context parameter (the spec wins over the context)
    assert reg.resolved({"name": "sched", "base_value": 2.0}, context=("base_value",))["base_value"] == 2.0


@pytest.mark.parametrize(
    "registry, spec, context, message",
    [
        ("inheritance", {"name": "auto", "target_sparsity": 1.5}, {}, "target_sparsity must be in"),
        ("inheritance", {"name": "auto", "prune_step": 200, "ramp_steps": 10}, {"total_steps": 100},
         r"prune_step \(200\) is after the last step"),
        ("inheritance", {"name": "auto", "start_sparsity": 0.6, "target_sparsity": 0.5}, {}, "start_sparsity"),
        ("inheritance", {"name": "auto", "lambda_lr": -1}, {}, "lambda_lr must be >= 0"),
        ("schedules", {"name": "warmup_cosine", "warmup_steps": 20}, {"base_value": 1e-3, "total_steps": 10},
         r"warmup_steps \(20\) is longer than the run"),
        ("schedules", {"name": "warmup_cosine"}, {"base_value": -1e-3, "total_steps": 10}, "must be >= 0"),
        ("schedules", {"name": "step_decay", "milestones": [5], "gamma": 0}, {"base_value": 1.0}, "gamma must be > 0"),
        ("losses", {"name": "affinity", "weight_i2t": -0.5}, {}, "weight_i2t: expected a finite number >= 0"),
        ("losses", {"name": "unimodal_affinity", "weight_text": float("inf")}, {}, "weight_text"),
        ("losses", {"name": "feature_distill", "weight_image": -1}, {}, "weight_image"),
    ],
)
def test_builtin_constructors_refuse_bad_values(registry, spec, context, message):
    from compress.registry import REGISTRIES

    with pytest.raises(RegistryError, match=message):
        REGISTRIES[registry].validate(spec, context)


def test_builtin_constructors_accept_the_boundaries():
    from compress.registry import INHERITANCE

    auto = INHERITANCE.validate({"name": "auto", "prune_step": 100, "ramp_steps": 100}, {"total_steps": 100})
    assert (auto.prune_step, auto.schedule(100)) == (100, auto.target_sparsity)
    lr = SCHEDULES.validate({"name": "warmup_cosine", "warmup_steps": 10}, {"base_value": 1e-3, "total_steps": 10})
    assert lr(9) == pytest.approx(1e-3)
