"""The memory plan (:mod:`compress.memory`): the formulas on hand-computed shapes, against the tensors a
real forward and a real loss keep for the backward, and in the dry run of a shipped recipe."""

import torch

from compress.memory import (
    BlockShape,
    ModelShape,
    TowerShape,
    estimate_device_memory,
    estimate_host_memory,
    model_shape,
    shape_of_model,
    tower_activation_bytes,
    world_size_of,
)
from compress.models import load_model
from compress.recipe import config_from_dict
from experiments.cli import main


def _config(**train):
    return config_from_dict({
        "name": "mem", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"}, "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "weight": 1.0}, {"name": "clip", "weight": 0.0}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}, "num_workers": 3},
        "train": {"steps": 2, "batch_size": 8, "accum_steps": 2, **train},
    })


def _tiny(parameters: int, image_size: int) -> ModelShape:
    """One block per tower: width 8, 2 heads of 4, MLP 16; vision s = (4 / 2)^2 + 1 = 5, text s = 4."""
    block = BlockShape(width=8, heads=2, head_dim=4, mlp_width=16)
    return ModelShape(parameters, image_size, 4, 16, TowerShape("vision", 5, 8, (block,), 3 * image_size**2),
                      TowerShape("text", 4, 8, (block,)))


def test_known_answers_on_a_tiny_shape():
    """By hand, fp32 (c = 4), 2 samples: a vision block keeps 4(2*5*8 + 4*5 + 2*5) + 4(2*5*8 + 4*5*8 + 2*5*16)
    = 440 + 1600 = 2040 B per sample, its stem 4*48 + 4*2*5*8 = 512; a text block 4(64 + 16 + 8) +
    4(64 + 128 + 128) = 1632, its stem 4*2*4*8 = 256. With checkpointing a tower keeps its block inputs
    (4 s h) and one block recomputed."""
    student = _tiny(1000, 4)
    assert tower_activation_bytes(student.vision, 2, 4, checkpointing=False) == 2 * (2040 + 512)
    assert tower_activation_bytes(student.text, 2, 4, checkpointing=False) == 2 * (1632 + 256)
    assert tower_activation_bytes(student.vision, 2, 4, checkpointing=True) == 2 * (160 + 2040 + 512)
    assert tower_activation_bytes(student.text, 2, 4, checkpointing=True) == 2 * (128 + 1632 + 256)
    # batch 8 over 2 processes x 2 micro-batches: micro-batch 2, rows 4 of 8 columns
    m = estimate_device_memory(_config(), student, _tiny(3000, 8), world_size=2, precision="fp32")
    assert (m.micro_batch, m.rows, m.columns) == (2, 4, 8)
    assert m.weights == 4 * 1000 + 4 * 3000
    assert m.optimizer == 12 * 1000 + 4 * 1000  # AdamW moments + grads, DDP buckets with 2 processes
    assert m.activations == 2 * (2040 + 512) + 2 * (1632 + 256)
    assert m.features == 4 * 2 * 2 * (4 + 8) * 16
    assert m.similarity_matrices == 4  # affinity; clip has weight 0 and is not computed
    assert m.similarities == 4 * 4 * 8 * (4 + 3)
    assert m.total == 16000 + 16000 + 8880 + 3072 + 896
    bf16 = estimate_device_memory(_config(), student, _tiny(3000, 8), world_size=1, precision="bf16")
    assert bf16.weights == 4 * 1000 + 2 * 1000 + 2 * 3000  # + autocast's 16-bit copies; teacher in bf16
    assert bf16.optimizer == 12 * 1000 and bf16.rows == 8
    # a scheduled weight counts the clip loss in (its 2 matrices)
    scheduled = _config()
    scheduled.schedules["weight/clip"] = {"name": "constant"}
    assert estimate_device_memory(scheduled, student, None, world_size=1).similarity_matrices == 6
    # host: 3 workers x 2 micro-batches of 2 samples, a sample = 3*4*4*4 + the teacher's 3*8*8*4 + 8*4 = 992 B
    h = estimate_host_memory(_config(accum_inputs="keep"), student, _tiny(3000, 8), world_size=2)
    assert (h.bytes_per_sample, h.batches_in_flight, h.in_flight) == (992, 6, 6 * 2 * 992)
    assert (h.loaders, h.retained_samples, h.retained) == (1, 4, 4 * 992)
    # read again (the default): a second loader's batches in flight, and of the step only its 4 x 4 tokens
    again = estimate_host_memory(_config(), student, _tiny(3000, 8), world_size=2)
    assert (again.loaders, again.batches_in_flight, again.in_flight) == (2, 12, 12 * 2 * 992)
    assert (again.retained_samples, again.retained) == (0, 4 * 8 * 4)
    one = estimate_host_memory(_config(accum_steps=1), student, _tiny(3000, 8), world_size=2)
    assert (one.loaders, one.retained_samples) == (1, 4)  # one micro-batch: read once, nothing to read again


def test_world_size_is_the_dispatch_processes():
    cfg = _config()
    cfg.dispatch.nodes, cfg.dispatch.gpus_per_node = 2, 4
    assert world_size_of(cfg) == 8
    cfg.dispatch.gpus_per_node = 0  # CPU: one process per node
    assert world_size_of(cfg) == 2
    cfg.dispatch.tasks_per_node = 3  # CPU processes per node, apart from GPUs
    assert world_size_of(cfg) == 6


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_the_activation_formula_matches_what_a_real_forward_keeps():
    """fp32, no checkpointing: the bytes autograd keeps per sample (the difference of two batch sizes,
    so that the weights it keeps cancel) are within 5% of the formula for both towers."""
    model = load_model("cc-test-student").train()
    shape = shape_of_model(model)
    assert shape == model_shape(model.clip_cfg, shape.parameters)
    cfg = model.clip_cfg
    for tower, encode, make in (
        (shape.vision, model.encode_image, lambda b: torch.randn(b, 3, shape.image_size, shape.image_size)),
        (shape.text, model.encode_text, lambda b: torch.randint(0, 1000, (b, cfg["text_cfg"]["context_length"]))),
    ):
        big, small = make(12), make(4)
        measured = (_saved_bytes(lambda: encode(big)) - _saved_bytes(lambda: encode(small))) / 8  # noqa: B023
        formula = tower_activation_bytes(tower, 1, 4, checkpointing=False)
        assert abs(measured - formula) <= 0.05 * measured, (tower.kind, measured, formula)


def test_affinity_keeps_the_similarity_matrices_it_declares():
    """The affinity loss keeps ``similarity_matrices`` (4) rows x columns matrices for its backward."""
    from compress.outputs import ClipOutput
    from compress.registry import LOSSES

    n, e = 64, 8
    features = [torch.nn.functional.normalize(torch.randn(n, e), dim=-1) for _ in range(4)]
    student = ClipOutput(features[0].requires_grad_(), features[1].requires_grad_(), torch.tensor(50.0))
    teacher = ClipOutput(features[2], features[3], torch.tensor(50.0))
    loss = LOSSES.build({"name": "affinity"})
    kept = _saved_bytes(lambda: loss(student, teacher))
    matrices = round(kept / (4 * n * n))
    assert matrices == type(loss).similarity_matrices == 4, kept


def test_dry_run_of_a_shipped_recipe_shows_the_micro_batch_and_memory(capsys):
    assert main(["run", "experiments/configs/tinyclip/vit-b32-manual.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    memory = [line for line in out.splitlines() if "memory" in line and "micro-batch" in line]
    assert len(memory) == 2 and all("micro-batch 256 per process (batch 32768 / (1 process x 128" in x for x in memory)
    # read again by a second loader (accum_inputs: reread): flat in accum_steps, the step's tokens only
    assert "host ~4.6 GiB: 4.6 GiB in flight in 2 loaders (32 micro-batches of 256" in out
    assert "+ 19 MiB for the step's tokens (for the loss)" in out
    assert "similarities 28.0 GiB (4 + 3 working of 32768 x 32768 fp32)" in out
    assert "device ~" in out and "activations" in out and "(one micro-batch, grad checkpointing)" in out


def test_a_step_beyond_an_80_gib_gpu_is_a_warning_of_the_dry_run(capsys):
    """Global batch 65536 on one GPU: 7 fp32 matrices of 65536 x 65536 (112 GiB) do not fit any GPU."""
    args = ["run", "experiments/configs/tinyclip/vit-b32-manual.yaml", "--dry-run", "--set", "train.batch_size=65536"]
    assert main(args) == 0
    warnings = capsys.readouterr().out.split("warnings:")[1]
    assert "vit61m: the device memory estimate ~" in warnings and "more than an 80 GiB GPU holds" in warnings
    assert "(largest: similarities 112.0 GiB)" in warnings
