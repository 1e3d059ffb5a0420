import pytest
import yaml

from compress.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config, run_id

BASE = {
    "name": "t",
    "teacher": {"model": "cc-test-teacher", "random_init": True},
    "student": {"model": "cc-test-student"},
    "inheritance": {"name": "constant_inheritance_stub"},
}


def minimal(**extra):
    data = {"name": "t", "teacher": {"model": "cc-test-teacher", "random_init": True}, "student": {"model": "cc-test-student"}}
    data.update(extra)
    return data


@pytest.fixture
def with_plugins():
    """Register tiny stand-in plug-ins so config tests do not depend on the built-ins' details."""
    from compress.plugins import DistillLoss, Inheritance
    from compress.registry import INHERITANCE, LOSSES

    with LOSSES.scoped(), INHERITANCE.scoped():

        @LOSSES.register("toy_loss")
        class Toy(DistillLoss):
            def __init__(self, scale: float = 1.0) -> None:
                super().__init__()

        @LOSSES.register("toy_teacherless")
        class ToyFree(DistillLoss):
            needs_teacher = False

        @INHERITANCE.register("toy_inherit")
        class ToyInherit(Inheritance):
            def __init__(self, layer_choice: str = "interval") -> None:
                pass

        yield


def cfg_dict(**extra):
    data = minimal(inheritance={"name": "toy_inherit"}, losses=[{"name": "toy_loss", "weight": 1.0}])
    data.update(extra)
    return data


def test_defaults_and_types(with_plugins):
    cfg = config_from_dict(cfg_dict(train={"lr": "3e-4", "betas": [0.9, 0.98], "steps": 10}))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.betas == (0.9, 0.98)
    assert cfg.student.model == "cc-test-student"


def test_unknown_key_names_path_and_suggests(with_plugins):
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg_dict(train={"lrr": 1e-3}))
    assert "'train.lrr'" in str(e.value) and "Did you mean 'lr'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'techer'.*Did you mean 'teacher'"):
        config_from_dict(cfg_dict(techer={"model": "x"}))


def test_wrong_type_names_path(with_plugins):
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        config_from_dict(cfg_dict(train={"steps": "many"}))


def test_unknown_plugin_and_param(with_plugins):
    with pytest.raises(ConfigError, match=r"losses\[0\].*unknown losses 'toy_los'.*Did you mean 'toy_loss'"):
        config_from_dict(cfg_dict(losses=[{"name": "toy_los"}]))
    with pytest.raises(ConfigError, match=r"losses\[0\].*no parameter 'scal'.*Did you mean 'scale'"):
        config_from_dict(cfg_dict(losses=[{"name": "toy_loss", "scal": 2}]))
    with pytest.raises(ConfigError, match="inheritance.*no parameter 'layers_choice'"):
        config_from_dict(cfg_dict(inheritance={"name": "toy_inherit", "layers_choice": "x"}))
    with pytest.raises(ConfigError, match=r"schedules.lr.*no parameter 'warmup'.*warmup_steps"):
        config_from_dict(cfg_dict(schedules={"lr": {"name": "warmup_cosine", "warmup": 3}}))


def test_teacher_required_by_losses(with_plugins):
    with pytest.raises(ConfigError, match="need a teacher"):
        config_from_dict(cfg_dict(teacher=None))
    config_from_dict(cfg_dict(teacher=None, losses=[{"name": "toy_teacherless"}]))


def test_overrides_dotted_and_list_index(with_plugins):
    data = cfg_dict()
    out = apply_overrides(data, ["train.lr=3e-4", "losses.0.weight=2", "seed=7", "eval.retrieval=false"])
    assert out["train"]["lr"] == pytest.approx(3e-4)
    assert out["losses"][0]["weight"] == 2
    assert out["seed"] == 7 and out["eval"]["retrieval"] is False
    assert data["losses"][0]["weight"] == 1.0  # input not mutated
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(data, ["train.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["losses.3.weight=1"])
    with pytest.raises(ConfigError, match="'train.lrr'"):
        config_from_dict(data, ["train.lrr=1"])


def test_run_id_ignores_output_and_dispatch(with_plugins):
    a = config_from_dict(cfg_dict())
    b = config_from_dict(cfg_dict(output={"dir": "elsewhere"}, dispatch={"backend": "local"}))
    c = config_from_dict(cfg_dict(train={"lr": 5e-4}))
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id(c)
    assert run_id(a) == a.run_id() and len(run_id(a)) == 12


def test_load_yaml_file_and_errors(tmp_path, with_plugins):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg_dict()))
    cfg = load_config(path, ["train.steps=5"])
    assert cfg.train.steps == 5
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        load_config(unsafe)


def test_schema_version_and_ranges(with_plugins):
    with pytest.raises(ConfigError, match="schema_version"):
        config_from_dict(cfg_dict(schema_version=99))
    with pytest.raises(ConfigError, match="divisible"):
        config_from_dict(cfg_dict(train={"batch_size": 10, "accum_steps": 3}))
    with pytest.raises(ConfigError, match="precision.*Did you mean 'bf16'"):
        config_from_dict(cfg_dict(train={"precision": "bf61"}))
