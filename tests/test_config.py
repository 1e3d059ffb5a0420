import pytest
import yaml

from compress.config import ConfigError, RunConfig, apply_overrides
from compress.recipe import config_from_dict, load_config, run_id, run_id_of


def minimal(**extra):
    data = {"name": "t", "teacher": {"model": "cc-test-teacher", "random_init": True},
            "student": {"model": "cc-test-student"}}
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
            needs_source = False  # a teacher is then only needed by the losses

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
    assert run_id(a) == run_id_of(a) and len(run_id(a)) == 12


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
    with pytest.raises(ConfigError, match="unsafe.yaml: not valid YAML.*python/object"):
        load_config(unsafe)


def test_schema_version_and_ranges(with_plugins):
    with pytest.raises(ConfigError, match="schema_version"):
        config_from_dict(cfg_dict(schema_version=99))
    with pytest.raises(ConfigError, match="divisible"):
        config_from_dict(cfg_dict(train={"batch_size": 10, "accum_steps": 3}))
    with pytest.raises(ConfigError, match="precision.*Did you mean 'bf16'"):
        config_from_dict(cfg_dict(train={"precision": "bf61"}))


# -- the run id hashes the resolved config (issue 7, point 11) ------------------------------------


def builtin_dict(**extra):
    """A config of built-in plug-ins (their real signatures matter for the run id)."""
    data = minimal(
        inheritance={"name": "manual"},
        losses=[{"name": "affinity", "weight": 1.0}],
        schedules={"lr": {"name": "warmup_cosine", "warmup_steps": 2}},
        train={"steps": 10, "batch_size": 8},
    )
    data.update(extra)
    return data


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "progress", False),
        ("train", "log_every", 3),
        ("train", "checkpoint_every", 5),
        ("train", "device", "cpu"),
        ("train", "grad_checkpointing", True),
        ("train", "accum_inputs", "keep"),
        ("train", "report_to", ["jsonl", "tensorboard", "wandb"]),
        ("data", "num_workers", 4),
        ("eval", "throughput", False),
        ("eval", "batch_size", 7),
        ("output", "dir", "elsewhere"),
        ("output", "run_name", "named"),
        ("output", "save_checkpoint", False),
        ("dispatch", "backend", "local"),
        ("dispatch", "timeout_min", 5),
    ],
)
def test_run_id_ignores_settings_that_do_not_change_the_result(section, key, value):
    base = builtin_dict()
    changed = builtin_dict(**{section: {**base.get(section, {}), key: value}})
    assert config_from_dict(changed).to_dict()[section][key] == value  # the setting is really applied
    assert run_id(config_from_dict(changed)) == run_id(config_from_dict(base))


@pytest.mark.parametrize(
    "override",
    ["seed=1", "train.lr=5e-4", "train.steps=11", "train.precision=bf16", "train.accum_steps=2",
     "data.train.num_samples=100", "eval.retrieval=false", "eval.macs=false", "losses.0.weight=2",
     "losses.0.scale=20", "inheritance.layer_choice=uniform", "schedules.lr.warmup_steps=3",
     "teacher.model=cc-test-rn-teacher", "student.model=cc-test-rn-student"],
)
def test_run_id_changes_with_settings_that_change_the_result(override):
    assert run_id_of(config_from_dict(builtin_dict(), [override])) != run_id_of(config_from_dict(builtin_dict()))


def test_run_id_same_when_plugin_defaults_are_written_out():
    plain = config_from_dict(builtin_dict())
    explicit = config_from_dict(builtin_dict(
        inheritance={"name": "manual", "layer_choice": "interval"},               # inheritance default
        losses=[{"name": "affinity", "scale": 50, "weight_i2t": 0.5}],           # loss defaults, int 50, weight
        schedules={"lr": {"name": "warmup_cosine", "warmup_steps": 2, "min_value": 0}},  # schedule default
    ))
    assert run_id(explicit) == run_id(plain)


def test_run_id_does_not_fill_parameters_the_engine_supplies():
    # `constant` defaults base_value to 1.0, but for the lr the engine passes train.lr: writing
    # base_value: 1.0 changes the lr, so it must change the id
    offered = config_from_dict(builtin_dict(schedules={"lr": {"name": "constant"}}))
    written = config_from_dict(builtin_dict(schedules={"lr": {"name": "constant", "base_value": 1.0}}))
    assert run_id(offered) != run_id(written)


# -- overrides on top of the defaults (point 12) --------------------------------------------------


def test_override_of_a_default_list_when_the_yaml_has_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(inheritance={"name": "manual"})))  # no losses, no schedules
    cfg = load_config(path, ["losses.0.weight=2", "schedules.lr.warmup_steps=3", "train.steps=5"])
    assert cfg.losses == [{"name": "affinity", "weight": 2}]
    assert cfg.schedules["lr"] == {"name": "warmup_cosine", "warmup_steps": 3}
    assert cfg.train.steps == 5 and cfg.train.lr == RunConfig().train.lr


def test_yaml_plugin_specs_replace_the_defaults_whole():
    cfg = config_from_dict(builtin_dict(losses=[{"name": "clip"}], schedules={"lr": {"name": "constant"}},
                                        train={"lr": 1e-3}))
    assert cfg.losses == [{"name": "clip"}]  # not merged with the default affinity term
    assert cfg.schedules == {"lr": {"name": "constant"}}  # no warmup_steps from the default
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == RunConfig().train.batch_size


# -- refused before compute (point 16) and the student per inheritance (point 9) ------------------


def test_empty_yaml_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="config file .*empty.yaml is empty"):
            load_config(path)


@pytest.mark.parametrize("model", ["ViT-B-32", "cc-test-teacher"])
def test_teacher_without_weights_is_refused_unless_random_init(model):
    student = {"model": "cc-test-student" if model.startswith("cc-") else "TinyCLIP-ViT-8M-16-Text-3M"}  # same tokens
    with pytest.raises(ConfigError, match="teacher.model: .* has no weights.*random_init: true"):
        config_from_dict(builtin_dict(teacher={"model": model}, student=student))
    cfg = config_from_dict(builtin_dict(teacher={"model": model, "random_init": True}, student=student))
    assert cfg.teacher.random_init


def test_unknown_model_names_and_missing_folders_are_refused_at_validation():
    with pytest.raises(ConfigError, match="teacher.model: .*no such file or folder: typo/of/a/folder"):
        config_from_dict(builtin_dict(teacher={"model": "typo/of/a/folder"}))
    with pytest.raises(ConfigError, match="teacher.model: no such file or folder: typo/of/a/folder"):
        config_from_dict(builtin_dict(teacher={"model": "typo/of/a/folder", "random_init": True}))
    with pytest.raises(ConfigError, match="teacher.model: unknown model config 'ViT-B-23'.*Did you mean 'ViT-B-32'"):
        config_from_dict(builtin_dict(teacher={"model": "ViT-B-23@laion2b_s34b_b79k"}))
    with pytest.raises(ConfigError, match="student.model: unknown model config 'cc-test-studnet'"):
        config_from_dict(builtin_dict(student={"model": "cc-test-studnet"}))


def test_the_default_teacher_is_refused():
    data = builtin_dict()
    del data["teacher"]  # RunConfig's default teacher is a bare ViT-B-32
    with pytest.raises(ConfigError, match="'ViT-B-32' has no weights"):
        config_from_dict(data)


def test_teacher_json_config_needs_pretrained(tmp_path):
    import json

    from compress.models import get_model_config

    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(get_model_config("cc-test-teacher")))
    with pytest.raises(ConfigError, match="has no weights"):
        config_from_dict(builtin_dict(teacher={"model": str(path)}))
    weights = str(tmp_path / "w.safetensors")
    assert config_from_dict(builtin_dict(teacher={"model": str(path), "pretrained": weights})).teacher.pretrained


@pytest.mark.parametrize(
    "teacher",
    [{"model": "ViT-B-32@laion2b_s34b_b79k"}, {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
     {"model": "ViT-B-32", "pretrained": "/ckpt/teacher.pt"}, {"model": "/ckpt/teacher.safetensors"}],
)
def test_teacher_with_weights_is_accepted_and_refuses_random_init(teacher):
    student = {"model": "TinyCLIP-ViT-8M-16-Text-3M"}  # the teacher's tokenizer and context length
    assert config_from_dict(builtin_dict(teacher=teacher, student=student)).teacher.random_init is False
    with pytest.raises(ConfigError, match="teacher.random_init: true, but .* loads weights"):
        config_from_dict(builtin_dict(teacher={**teacher, "random_init": True}, student=student))


def test_teacher_exported_folder_has_weights(tmp_path):
    assert config_from_dict(builtin_dict(teacher={"model": str(tmp_path)})).teacher.model == str(tmp_path)


def test_student_random_init_is_refused():
    with pytest.raises(ConfigError, match="student.random_init"):
        config_from_dict(builtin_dict(student={"model": "cc-test-student", "random_init": True}))


def test_student_refused_with_auto_and_required_by_manual_and_none():
    auto = {"name": "auto", "prune_step": 5, "ramp_steps": 2}
    with pytest.raises(ConfigError, match="student: inheritance 'auto' derives the student"):
        config_from_dict(builtin_dict(inheritance=auto))
    assert config_from_dict(builtin_dict(inheritance=auto, student=None)).student is None
    for name in ("manual", "none"):
        with pytest.raises(ConfigError, match=f"student: inheritance '{name}' needs a student"):
            config_from_dict(builtin_dict(inheritance={"name": name}, student=None))


def test_inheritance_that_reads_the_teacher_needs_one():
    clip_only = {"teacher": None, "losses": [{"name": "clip"}]}
    for inheritance, student in (({"name": "auto", "prune_step": 5, "ramp_steps": 2}, None),
                                 ({"name": "manual"}, {"model": "cc-test-student"})):
        with pytest.raises(ConfigError, match=f"teacher: inheritance '{inheritance['name']}' takes the student"):
            config_from_dict(builtin_dict(inheritance=inheritance, student=student, **clip_only))
    assert config_from_dict(builtin_dict(inheritance={"name": "none"}, **clip_only)).teacher is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedules.lr.warmup_steps=11", r"schedules.lr: .*warmup_steps \(11\) is longer than the run"),
        ("inheritance={name: auto, target_sparsity: 1.5}", "inheritance: .*target_sparsity must be in"),
        ("inheritance={name: auto, prune_step: 11, ramp_steps: 5}", r"inheritance: .*prune_step \(11\).*train.steps"),
        ("inheritance={name: auto, prune_step: 5}", r"inheritance: .*ramp_steps \(1000\).*prune_step \(5\)"),
        ("inheritance={name: auto, prune_step: 5, ramp_steps: 2, mask_lr: -0.1}", "inheritance: .*mask_lr"),
        ("losses.0.scale=-1", r"losses\[0\]: .*scale"),
        ("losses.0.weight_t2i=-1", r"losses\[0\]: .*weight_t2i"),
        ("losses.0.weight=-1", r"losses\[0\].weight: must be a finite number >= 0"),
        ("losses.0.weight=.nan", r"losses\[0\].weight: must be a finite number >= 0"),
        ("train.lr=-1e-4", "train.lr: must be"),
        ("train.device=bogus", "train.device: 'bogus' is not auto, cpu, cuda, cuda:N or mps"),
        ("eval.batch_size=0", "eval.batch_size: must be at least 1"),
        ("eval.zero_shot=[{name: x, kind: imagenett, path: /x}]", r"zero_shot\[0\].kind: .*'imagenet'"),
        ("eval.zero_shot=[{name: x, kind: folder}]", r"eval.zero_shot\[0\].path"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.eps=0", "train.eps"),
        ("train.betas=[0.9, 1.0]", r"train.betas\[1\]"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.log_every=0", "train.log_every"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("train.accum_inputs=rereed", r"train.accum_inputs: 'rereed' is not one of reread, keep.*'reread'"),
        ("data.train.max_bad_fraction=5", r"data.train.max_bad_fraction: must be a fraction in \[0, 1\)"),
        ("data.val={max_bad_fraction: -0.1}", "data.val.max_bad_fraction"),
        ("data.num_workers=-1", "data.num_workers"),
    ],
)
def test_wrong_values_refused_at_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(builtin_dict(), [override, *(["student=null"] if "auto" in override else [])])


def test_boundary_values_are_accepted():
    cfg = config_from_dict(builtin_dict(), [
        "schedules.lr.warmup_steps=10", "train.grad_clip=0", "train.lr=0", "data.train.max_bad_fraction=0.99",
        "data.val={max_bad_fraction: 0}", "train.betas=[0, 0.999]",
    ])
    assert cfg.schedules["lr"]["warmup_steps"] == cfg.train.steps
    auto = config_from_dict(builtin_dict(inheritance={"name": "auto", "prune_step": 10, "ramp_steps": 10},
                                         student=None))
    assert auto.inheritance["prune_step"] == auto.train.steps


def test_has_weights_agrees_with_what_load_model_loads(tmp_path):
    """The validation's classification against the loader itself: a spec without weights gives a
    different model per seed, a spec with weights gives the saved weights every time."""
    import json

    import torch

    from compress.models import get_model_config, load_model
    from compress.models.export import checkpoint_metadata, save_open_clip, save_safetensors
    from compress.models.factory import has_weights

    def first_weight(model):
        return next(iter(model.state_dict().values())).clone()

    def loads_same_twice(spec, pretrained=None):
        torch.manual_seed(0)
        a = first_weight(load_model(spec, pretrained=pretrained))
        torch.manual_seed(1)
        return torch.equal(a, first_weight(load_model(spec, pretrained=pretrained)))

    source = load_model("cc-test-teacher")
    config = tmp_path / "teacher.json"
    config.write_text(json.dumps(get_model_config("cc-test-teacher")))
    checkpoint = tmp_path / "teacher.safetensors"
    save_safetensors(source.state_dict(), checkpoint, checkpoint_metadata(source))
    folder = save_open_clip(source, tmp_path / "exported")
    cases = [("cc-test-teacher", None), (str(config), None), ("cc-test-teacher", str(checkpoint)),
             (str(config), str(checkpoint)), (str(checkpoint), None), (str(folder), None)]
    for spec, pretrained in cases:
        assert has_weights(spec, pretrained) == loads_same_twice(spec, pretrained), (spec, pretrained)
    assert [has_weights(s, p) for s, p in cases] == [False, False, True, True, True, True]


def test_lr_schedule_is_required():
    with pytest.raises(ConfigError, match="schedules.lr: a learning-rate schedule is required"):
        config_from_dict(builtin_dict(schedules={"weight/affinity": {"name": "constant"}}))


# -- what a new user meets (issue 16): a key written twice, and errors an override brings in --------------------
def _tiny_yaml(**extra) -> str:
    return yaml.safe_dump({**builtin_dict(), **extra}, sort_keys=False)


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("name: first\nseed: 0\nname: second\n", "name", "lines 1 and 3"),
    ("train:\n  lr: 1.0e-3\n  steps: 4\n  lr: 3.0e-4\n", "train.lr", "lines 2 and 4"),
    ("losses:\n  - {name: affinity, scale: 50, scale: 40}\n", "losses.0.scale", "twice on line 2"),
])
def test_a_key_written_twice_is_refused_naming_key_file_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: duplicate key {key!r} ({lines})"


def test_yaml_merge_keys_may_override_what_they_merge():
    from compress.config import yaml_load

    text = "defaults: &d {lr: 1.0e-3, steps: 4}\ntrain:\n  <<: *d\n  lr: 3.0e-4\n"
    assert yaml_load(text)["train"] == {"lr": 3.0e-4, "steps": 4}


def test_set_errors_name_the_override_not_the_file(tmp_path):
    from compress.config import OverrideError

    path = tmp_path / "base.yaml"
    path.write_text(_tiny_yaml())
    for override, message in (
        ("train.lrate=1e-3", "--set train.lrate=1e-3: unknown key 'train.lrate'. Did you mean 'lr'?"),
        ("train.lr=fast", "--set train.lr=fast: train.lr: expected a number, got 'fast'"),
        ("train.steps=0", "--set train.steps=0: train.steps: must be at least 1, got 0"),
        ("name.first=x", "--set name.first=x: 'name' is not a mapping"),
        ("train.lr", "--set train.lr: not of the form key.path=value"),
    ):
        with pytest.raises(OverrideError) as error:
            load_config(path, ["train.steps=2", override])
        assert str(error.value).startswith(message) and str(path) not in str(error.value)
    # the file's own mistake stays the file's, whatever the overrides
    path.write_text(_tiny_yaml(train={"lrr": 1e-3}))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'train.lrr'") as error:
        load_config(path, ["train.steps=2"])
    assert not isinstance(error.value, OverrideError)
