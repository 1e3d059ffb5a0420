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
    for reg in (SCHEDULES,):
        assert reg.names()
        assert all(e.description for e in reg.entries())
    assert {"warmup_cosine", "linear_ramp", "constant"} <= set(SCHEDULES.names())


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
