"""``importance`` inheritance (issue 20): torch-pruning's criteria against formulas computed here, the budget, uniform
and per-layer widths, drop_layers, round_to, the export against an independently sliced source, the scores cache,
the engine's calibration seam, a staged run resumed after a stop, the dry run and the refusals."""

import copy
import json

import open_clip
import pytest
import torch
from torch.nn import functional as F

from compress.checkpoint import rng_state
from compress.models import load_model
from compress.models.params import prunable_count
from compress.models.structure import TowerKeep, describe_structure
from compress.models.towers import get_tower
from compress.plan import build_plan, format_plan
from compress.plugins import Calibration
from compress.run import run_dir_for, run_experiment
from strategies.inheritance.importance import ImportanceInheritance, _costs, prune_kept
from strategies.inheritance.importance_scores import activation_scores, magnitude_scores, taylor_scores
from strategies.inheritance.importance_select import select_units
from tests.test_resume import TRAIN, Stop, assert_same, outcome, stop_at
from tests.test_run_e2e import tiny_config

NO_EVAL = {"zero_shot": [], "retrieval": False, "throughput": False, "macs": False}
TOWERS = ("vision", "text")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return load_model("cc-test-teacher").eval()


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "texts": torch.randint(1, 400, (n, 16), generator=g)}


def head_rows(block, h):
    """The weights of head ``h`` of a block: its q, k, v rows of in_proj and its out_proj columns."""
    d, inner = block.attn.head_dim, block.attn.num_heads * block.attn.head_dim
    rows = torch.cat([block.attn.in_proj_weight[q * inner + h * d: q * inner + (h + 1) * d] for q in range(3)])
    return rows, block.attn.out_proj.weight[:, h * d:(h + 1) * d]


def test_magnitude_scores_are_the_sum_of_squares_of_each_units_weights(teacher):
    scores = magnitude_scores(teacher, TOWERS)
    for name in TOWERS:
        for i, block in enumerate(get_tower(teacher, name).blocks):
            heads = torch.stack([sum(t.pow(2).sum() for t in head_rows(block, h))
                                 for h in range(block.attn.num_heads)])
            neurons = block.mlp.c_fc.weight.pow(2).sum(1) + block.mlp.c_proj.weight.pow(2).sum(0)
            torch.testing.assert_close(scores[f"{name}/heads/{i}"], heads.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(scores[f"{name}/neurons/{i}"], neurons.detach(), rtol=1e-5, atol=1e-6)
        assert scores[f"{name}/layers"][0] == pytest.approx(float(scores[f"{name}/heads/0"].sum()
                                                                  + scores[f"{name}/neurons/0"].sum()), rel=1e-5)


def padded_batch(n=4, seed=2, length=16):
    """Texts as the tokenizer writes them: tokens, the end-of-text token (the largest id) at a varying position,
    then padding (0)."""
    b = batch(n, seed)
    texts = torch.randint(1, 399, (n, length), generator=torch.Generator().manual_seed(seed))
    for i, end in enumerate(range(3, 3 + 2 * n, 2)):
        texts[i, end], texts[i, end + 1:] = 399, 0
    return {"images": b["images"], "texts": texts}


def taylor_reference(teacher, b):
    """Σ |w · ∂L/∂w| of vision layer 1's heads and neurons for one batch, L the CLIP loss computed here."""
    ref = copy.deepcopy(teacher).requires_grad_(True)
    image = F.normalize(ref.encode_image(b["images"]), dim=-1)
    text = F.normalize(ref.encode_text(b["texts"]), dim=-1)
    logits = ref.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    block = get_tower(ref, "vision").blocks[1]
    d, inner = block.attn.head_dim, block.attn.num_heads * block.attn.head_dim
    wg_in = (block.attn.in_proj_weight * block.attn.in_proj_weight.grad).abs()
    wg_out = (block.attn.out_proj.weight * block.attn.out_proj.weight.grad).abs()
    heads = torch.stack([sum(wg_in[q * inner + h * d: q * inner + (h + 1) * d].sum() for q in range(3))
                         + wg_out[:, h * d:(h + 1) * d].sum() for h in range(block.attn.num_heads)])
    neurons = ((block.mlp.c_fc.weight * block.mlp.c_fc.weight.grad).abs().sum(1)
               + (block.mlp.c_proj.weight * block.mlp.c_proj.weight.grad).abs().sum(0))
    return heads.detach(), neurons.detach()


def test_taylor_scores_are_the_per_batch_sum_of_abs_weight_times_gradient_of_the_clip_loss(teacher):
    """Molchanov's per-batch |w·g|, summed over the batches: not |w·Σg| (which the accumulated gradient gives)."""
    model = copy.deepcopy(teacher).requires_grad_(False).train()
    batches = [batch(), padded_batch()]
    scores = taylor_scores(model, TOWERS, batches, torch.device("cpu"))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters()) and model.training  # as it was
    refs = [taylor_reference(teacher, b) for b in batches]
    heads, neurons = refs[0][0] + refs[1][0], refs[0][1] + refs[1][1]
    torch.testing.assert_close(scores["vision/heads/1"], heads, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scores["vision/neurons/1"], neurons, rtol=1e-4, atol=1e-8)


def block_tensors(block, forward) -> dict:
    """What ``forward()`` (no grad) passes through ``block``: ``fc`` (c_fc's output), ``heads`` (out_proj's input),
    ``io`` (the block's input and output)."""
    seen = {}
    hooks = [block.mlp.c_fc.register_forward_hook(lambda m, a, out: seen.__setitem__("fc", out)),
             block.attn.out_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("heads", a[0])),
             block.register_forward_hook(lambda m, a, out: seen.__setitem__("io", (a[0], out)))]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_activation_scores_are_mean_activations_and_block_importance_over_the_real_tokens(teacher):
    """Text: only the positions up to each text's end-of-text token count (the padding after it never reaches the
    pooled feature)."""
    b = padded_batch()
    scores = activation_scores(teacher, TOWERS, [b], torch.device("cpu"))
    block = get_tower(teacher, "text").blocks[2]
    seen = block_tensors(block, lambda: teacher.encode_text(b["texts"]))
    ends = b["texts"].argmax(dim=-1).tolist()
    real = torch.zeros(b["texts"].shape, dtype=torch.bool)
    for i, end in enumerate(ends):
        real[i, : end + 1] = True
    assert not real.all()  # padding present: the test can tell the two averages apart
    act = block.mlp.gelu(seen["fc"])[real]
    torch.testing.assert_close(scores["text/neurons/2"], act.abs().mean(0), rtol=1e-4, atol=1e-6)
    heads = seen["heads"][real].reshape(-1, block.attn.num_heads, block.attn.head_dim).norm(dim=-1).mean(0)
    torch.testing.assert_close(scores["text/heads/2"], heads, rtol=1e-4, atol=1e-6)
    x, y = seen["io"]
    assert float(scores["text/layers"][2]) == pytest.approx(
        float(1 - F.cosine_similarity(x[real], y[real], dim=-1).mean()), rel=1e-4)
    padded_mean = block.mlp.gelu(seen["fc"]).reshape(-1, seen["fc"].shape[-1]).abs().mean(0)
    assert not torch.allclose(scores["text/neurons/2"], padded_mean, rtol=1e-3)


def test_vision_activation_scores_average_over_every_token_of_every_image(teacher):
    b = batch()
    scores = activation_scores(teacher, ("vision",), [b], torch.device("cpu"))
    block = get_tower(teacher, "vision").blocks[1]
    seen = block_tensors(block, lambda: teacher.encode_image(b["images"]))
    width, h, d = seen["fc"].shape[-1], block.attn.num_heads, block.attn.head_dim
    act = block.mlp.gelu(seen["fc"]).reshape(-1, width)
    assert len(act) == len(b["images"]) * (1 + (32 // teacher.visual.patch_size[0]) ** 2)  # class token + patches
    torch.testing.assert_close(scores["vision/neurons/1"], act.abs().mean(0), rtol=1e-4, atol=1e-6)
    heads = seen["heads"].reshape(-1, h, d).norm(dim=-1).mean(0)
    torch.testing.assert_close(scores["vision/heads/1"], heads, rtol=1e-4, atol=1e-6)
    x, y = (t.reshape(-1, t.shape[-1]) for t in seen["io"])
    assert float(scores["vision/layers"][1]) == pytest.approx(float(1 - F.cosine_similarity(x, y, dim=-1).mean()),
                                                              rel=1e-4)


def achieved(model, source, towers=TOWERS):
    return 1 - prunable_count(model, towers) / prunable_count(source, towers)


@pytest.mark.parametrize("widths", ["per_layer", "uniform"])
@pytest.mark.parametrize("budget", ["pooled", "per_tower"])
def test_the_budget_is_reached_within_rounding(teacher, widths, budget):
    strategy = ImportanceInheritance(0.5, criterion="magnitude", widths=widths, budget=budget)
    student = strategy.inherit(None, teacher)
    assert achieved(student, teacher) == pytest.approx(0.5, abs=0.02)
    if budget == "per_tower":
        for name in TOWERS:
            assert achieved(student, teacher, (name,)) == pytest.approx(0.5, abs=0.03)


def test_uniform_widths_keep_every_head_and_one_mlp_width_a_multiple_of_round_to_and_load_in_open_clip(teacher):
    student = ImportanceInheritance(0.4, criterion="magnitude", widths="uniform", round_to=16).inherit(None, teacher)
    for name in TOWERS:
        t = student.clip_structure[name]
        assert t["heads"] == t["full"]["heads"] and len(set(t["mlp_width"])) == 1 and t["mlp_width"][0] % 16 == 0
    plain = open_clip.CLIP(**student.clip_cfg).eval()
    plain.load_state_dict(student.state_dict(), strict=True)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(b["images"]), student.eval().encode_image(b["images"]))
        torch.testing.assert_close(plain.encode_text(b["texts"]), student.encode_text(b["texts"]))


@pytest.mark.parametrize("widths", ["per_layer", "uniform"])
def test_each_layer_keeps_its_best_scored_heads_and_neurons(teacher, widths):
    """The kept heads and neurons of a layer are the top-k of its scores (k the count kept), not any k of them."""
    scores = magnitude_scores(teacher, TOWERS)
    structure = describe_structure(teacher)
    keep = select_units(scores, structure, _costs(teacher, structure, TOWERS), TOWERS, 0.5, "pooled", widths, {}, 1)
    pruned = {"heads": 0, "neurons": 0}
    for name in TOWERS:
        for i, (heads, neurons) in enumerate(zip(keep[name].heads, keep[name].neurons, strict=True)):
            for kind, kept in (("heads", heads), ("neurons", neurons)):
                score = scores[f"{name}/{kind}/{i}"]
                best = torch.argsort(score, descending=True)[:len(kept)]
                assert set(kept.tolist()) == set(best.tolist()), (name, kind, i)
                pruned[kind] += len(score) - len(kept)
    assert pruned["neurons"] > 0
    assert (pruned["heads"] > 0) == (widths == "per_layer")  # uniform keeps every head (channels: keep)


def test_a_uniform_selection_open_clip_cannot_build_is_refused_not_saved_in_the_non_uniform_form(teacher, monkeypatch):
    monkeypatch.setattr("strategies.inheritance.importance.open_clip_config", lambda cfg, structure: None)
    with pytest.raises(ValueError, match="widths: uniform selected a student open_clip cannot build.*per_layer"):
        ImportanceInheritance(0.4, criterion="magnitude", widths="uniform").inherit(None, teacher)


def test_per_layer_widths_round_each_layers_neurons_to_round_to(teacher):
    student = ImportanceInheritance(0.5, criterion="magnitude", round_to=16).inherit(None, teacher)
    widths = [w for name in TOWERS for w in student.clip_structure[name]["mlp_width"]]
    assert all(w % 16 == 0 for w in widths) and len(set(widths)) > 1


def test_drop_layers_removes_the_lowest_scored_layers_first(teacher):
    scores = magnitude_scores(teacher, TOWERS)
    strategy = ImportanceInheritance(0.6, criterion="magnitude", drop_layers={"vision": 2, "text": 1})
    student = strategy.inherit(None, teacher)
    for name, k in (("vision", 2), ("text", 1)):
        worst = set(torch.argsort(scores[f"{name}/layers"])[:k].tolist())
        assert strategy.layer_map[name] == [i for i in range(4) if i not in worst]
        assert len(get_tower(student, name).blocks) == 4 - k == student.clip_cfg[f"{name}_cfg"]["layers"]
    assert achieved(student, teacher) == pytest.approx(0.6, abs=0.02)


def test_the_export_equals_the_source_sliced_independently(teacher):
    """Kept layers, heads and neurons through the structure code equal the source with the removed heads' and
    neurons' output weights zeroed and the dropped blocks skipped."""
    g = torch.Generator().manual_seed(3)
    keep, reference = {}, copy.deepcopy(teacher)
    for name in TOWERS:
        layers = [0, 2, 3]
        heads = [torch.sort(torch.randperm(4, generator=g)[:2]).values for _ in layers]
        neurons = [torch.sort(torch.randperm(256, generator=g)[:100]).values for _ in layers]
        keep[name] = TowerKeep(channels=torch.arange(64), heads=heads, neurons=neurons, layers=layers)
        tower = get_tower(reference, name)
        blocks = tower.blocks
        with torch.no_grad():
            for i, h, n in zip(layers, heads, neurons, strict=True):
                attn, mlp = blocks[i].attn, blocks[i].mlp
                for gone in set(range(4)) - set(h.tolist()):
                    attn.out_proj.weight[:, gone * 16:(gone + 1) * 16] = 0
                mask = torch.ones(256, dtype=torch.bool)
                mask[n] = False
                mlp.c_proj.weight[:, mask] = 0
        tower.transformer.resblocks = torch.nn.ModuleList([blocks[i] for i in layers])
    student = prune_kept(copy.deepcopy(teacher), keep).eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(b["images"]), reference.eval().encode_image(b["images"]))
        torch.testing.assert_close(student.encode_text(b["texts"]), reference.encode_text(b["texts"]))


@pytest.mark.slow
def test_the_scores_cache_and_scores_from_skip_the_calibration_pass(teacher, tmp_path, monkeypatch):
    path = tmp_path / "stage" / "importance" / "scores.safetensors"
    first = ImportanceInheritance(0.3, criterion="taylor", calibration_batches=1)
    first.prepare(Calibration(lambda: [batch()], path, torch.device("cpu")), teacher)
    assert path.is_file()
    a = first.inherit(None, teacher)

    def no_forward(*args, **kwargs):
        raise AssertionError("the source ran a forward pass")

    def no_batches():
        raise AssertionError("calibration batches were drawn")

    source = copy.deepcopy(teacher)
    monkeypatch.setattr(source, "encode_image", no_forward)
    monkeypatch.setattr(source, "encode_text", no_forward)
    again = ImportanceInheritance(0.3, criterion="taylor", calibration_batches=1)
    again.prepare(Calibration(no_batches, path, torch.device("cpu")), source)
    b = again.inherit(None, teacher)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # another target from the same scores: no calibration either
    other = ImportanceInheritance(0.6, criterion="taylor", scores_from=str(path))
    assert other.calibration_batches() == 0
    other.prepare(Calibration(no_batches, tmp_path / "other.safetensors", torch.device("cpu")), source)
    assert achieved(other.inherit(None, teacher), teacher) == pytest.approx(0.6, abs=0.02)
    # another criterion's cache is not reused; another criterion's scores_from is refused
    with pytest.raises(AssertionError, match="drawn"):
        ImportanceInheritance(0.3, criterion="activation", calibration_batches=1).prepare(
            Calibration(no_batches, path, torch.device("cpu")), source)
    with pytest.raises(ValueError, match="criterion differ"):
        ImportanceInheritance(0.3, criterion="activation", scores_from=str(path)).prepare(
            Calibration(no_batches, path, torch.device("cpu")), teacher)


@pytest.mark.slow
def test_calibration_batches_are_the_runs_first_batches_and_leave_its_random_state(tmp_path):
    from compress.data.pipeline import train_batches
    from compress.stage import StageRun, calibration_batches, prepare_inheritance

    cfg = tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "taylor"}, student=None)
    source = load_model("cc-test-teacher")
    before = rng_state()
    drawn = calibration_batches(StageRun(cfg, tmp_path, None, source, cfg.seed), 2, torch.device("cpu"))
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    stream, _ = train_batches(cfg, source, None, torch.device("cpu"))
    for got in drawn:
        want = next(stream)
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["texts"], want["texts"])
    # the whole seam (batches drawn, the source scored, the scores written) leaves the random states as they were
    strategy = ImportanceInheritance(0.3, criterion="taylor", calibration_batches=2)
    before = rng_state()
    prepare_inheritance(StageRun(cfg, tmp_path / "stage", None, source, cfg.seed), strategy)
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert (tmp_path / "stage" / "importance" / "scores.safetensors").is_file() and strategy.scores is not None


@pytest.mark.slow
def test_in_a_run_the_calibration_batches_are_the_first_micro_batches_its_own_loader_trains_on(tmp_path, monkeypatch):
    """End to end: the batches prepare() is given equal the first micro-batches of the run's own loader (built for
    the student, with the teacher's views), images and texts."""
    import compress.data.pipeline as pipeline

    real, streams, given = pipeline.train_batches, [], []

    def recording(*args, **kwargs):
        stream, stats = real(*args, **kwargs)
        seen = []
        streams.append(seen)

        def tee():
            for b in stream:
                seen.append({k: b[k].clone() for k in ("images", "texts")})
                yield b
        return tee(), stats

    prepare = ImportanceInheritance.prepare

    def keep_batches(self, calibration, source):
        given.extend(calibration.batches())
        return prepare(self, calibration, source)

    monkeypatch.setattr(pipeline, "train_batches", recording)
    monkeypatch.setattr(ImportanceInheritance, "prepare", keep_batches)
    cfg = tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "taylor", "calibration_batches": 2,
                                             "target_sparsity": 0.3},
                      student=None, train={**TRAIN, "steps": 2}, eval=NO_EVAL)
    assert run_experiment(cfg)["status"] == "completed"
    assert len(given) == 2 and len(streams) == 2  # the calibration's loader, then the run's
    for got, want in zip(given, streams[1][:2], strict=True):
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["texts"], want["texts"])


def assert_resumes_exactly(monkeypatch, cfg, straight, stage, step):
    """``cfg`` stopped at ``step`` of ``stage`` (None: a run without stages), then run again, ends as ``straight``
    (run uninterrupted)."""
    with monkeypatch.context() as patch:
        stop_at(patch, stage, step)
        with pytest.raises(Stop):
            run_experiment(cfg)
    assert run_experiment(cfg)["status"] == "completed"
    assert_same(outcome(run_dir_for(cfg)), outcome(run_dir_for(straight)))


def staged(tmp_path, out="runs", targets=(0.2, 0.4, 0.6)):
    return tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "taylor", "calibration_batches": 2},
                       student=None, stages={"targets": list(targets)}, train=TRAIN, eval=NO_EVAL,
                       output={"dir": str(tmp_path / out)})


@pytest.mark.slow
def test_a_three_stage_importance_run_stopped_in_its_second_stage_resumes_exactly(tmp_path, monkeypatch):
    straight = staged(tmp_path, out="straight")
    assert run_experiment(straight)["status"] == "completed"
    stages = sorted((run_dir_for(straight) / "stages").iterdir())
    assert len(stages) == 3 and all((s / "importance" / "scores.safetensors").is_file() for s in stages)
    last = json.loads((stages[-1] / "result.json").read_text())["metrics"]
    assert last["sparsity/achieved"] == pytest.approx(0.6, abs=0.02)
    cfg = staged(tmp_path)
    assert_resumes_exactly(monkeypatch, cfg, straight, "1-sparsity40", 5)


@pytest.mark.slow
def test_sigkill_in_the_second_importance_stage_then_the_same_command_resumes_exactly(tmp_path):
    """A real process of a 2-stage Taylor importance run, killed with SIGKILL in its second stage (after a checkpoint
    of that stage), then started again with the same command: the same weights, metrics series and rows as a run
    never stopped (the resumed stage rebuilds its student from the checkpoint's record)."""
    import os
    import sys

    import yaml

    from tests.test_resume import kill_and_resume

    train = {"steps": 12, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "checkpoint_every": 3}
    runs = {}
    for out in ("straight", "killed"):
        cfg = tiny_config(tmp_path, name="kill", student=None, stages={"targets": [0.2, 0.4]}, train=train,
                          inheritance={"name": "importance", "criterion": "taylor", "calibration_batches": 2},
                          eval=NO_EVAL, output={"dir": str(tmp_path / out)})
        runs[out] = tmp_path / f"{out}.yaml"
        runs[out].write_text(yaml.safe_dump(cfg.to_dict()))
    def scored(killed_at) -> None:  # the stage scored its source (and kept the scores) before it was killed
        assert (killed_at.path.parents[1] / "importance" / "scores.safetensors").is_file()

    kill_and_resume([sys.executable, "-m", "experiments", "run"], {**os.environ, "HF_HUB_OFFLINE": "1"}, runs,
                    tmp_path, 12, scored)


def test_the_dry_run_shows_criterion_target_widths_and_calibration(tmp_path):
    text = format_plan(build_plan(staged(tmp_path)))
    assert "student      the teacher pruned once by taylor importance (per-layer widths" in text
    assert "target       40.0% of the teacher's prunable parameters removed (cumulative)" in text
    assert "importance: criterion taylor, pooled budget over vision+text" in text
    assert "the split between towers and the MACs are decided by the importance scores, before step 0" in text
    assert "importance calibration: 2 training micro-batches, one forward + backward of the source each" in text


@pytest.mark.parametrize("kwargs, match", [
    ({"criterion": "magnitude", "calibration_batches": 4}, "no effect with criterion 'magnitude'"),
    ({"criterion": "taylor", "calibration_batches": 0}, "calibration_batches must be >= 1"),
    ({"criterion": "mope"}, "not built"),
    ({"criterion": "hessian"}, "criterion must be one of"),
    ({"widths": "cubic"}, "widths must be one of"),
    ({"budget": "layer"}, "budget must be one of"),
    ({"round_to": 0}, "round_to must be"),
    ({"drop_layers": -1}, "drop_layers must be"),
    ({"drop_layers": {"audio": 1}}, "drop_layers names"),
    ({"towers": "vision", "drop_layers": {"text": 1}}, "drop_layers names"),
    ({"scores_from": "/nonexistent/scores.safetensors"}, "no scores file"),
    ({"target_sparsity": 1.0}, "target_sparsity"),
])
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImportanceInheritance(**kwargs)


def test_refusals_against_the_source(teacher):
    with pytest.raises(ValueError, match="at least one stays"):
        ImportanceInheritance(0.5, criterion="magnitude", drop_layers=4).inherit(None, teacher)
    with pytest.raises(ValueError, match="more than the target"):
        ImportanceInheritance(0.1, criterion="magnitude", drop_layers=2).inherit(None, teacher)
    with pytest.raises(ValueError, match="calls prepare"):
        ImportanceInheritance(0.5, criterion="taylor").inherit(None, teacher)


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_restarts_from_the_kept_scores(tmp_path, monkeypatch):
    """Stopped at step 1 (no checkpoint yet): the restart reads the stage's scores (no calibration pass) and ends as
    a run never stopped."""
    import strategies.inheritance.importance as module

    def run(out):
        return tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "activation",
                                                  "calibration_batches": 2},
                           student=None, train=TRAIN, eval=NO_EVAL, output={"dir": str(tmp_path / out)})

    straight = run("straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = run("runs")
    with monkeypatch.context() as patch:
        stop_at(patch, None, 1)
        with pytest.raises(Stop):
            run_experiment(cfg)
    assert not (run_dir_for(cfg) / "checkpoints").exists() or not any((run_dir_for(cfg) / "checkpoints").iterdir())
    assert (run_dir_for(cfg) / "importance" / "scores.safetensors").is_file()

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(module, "compute_scores", no_scoring)
    assert run_experiment(cfg)["status"] == "completed"
    assert_same(outcome(run_dir_for(cfg)), outcome(run_dir_for(straight)))


@pytest.mark.slow
def test_a_uniform_run_with_dropped_layers_resumes_exactly(tmp_path, monkeypatch):
    """The student's fewer layers are in its checkpoint's config: a resume rebuilds it from the record alone."""
    def run(out):
        return tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "magnitude", "widths": "uniform",
                                                  "drop_layers": {"vision": 1}, "target_sparsity": 0.5},
                           student=None, train=TRAIN, eval=NO_EVAL, output={"dir": str(tmp_path / out)})

    straight = run("straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = run("runs")
    assert_resumes_exactly(monkeypatch, cfg, straight, None, 5)
    exported = load_model(json.loads((run_dir_for(cfg) / "result.json").read_text())["metrics"]["export/path"])
    assert len(get_tower(exported, "vision").blocks) == 3 and len(get_tower(exported, "text").blocks) == 4
    # the structure report aligns the student with its source by the layer map, which the resume restored
    resumed, uninterrupted = (json.loads((run_dir_for(c) / "structure.json").read_text()) for c in (cfg, straight))
    assert resumed == uninterrupted


def test_the_dry_run_refuses_more_layers_dropped_than_the_source_has_or_the_budget_allows(tmp_path):
    from compress.config import ConfigError
    from compress.plan.build import check_inheritances

    for drop, match in ((4, "at least one stays"), (2, "more than the target")):
        cfg = tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "magnitude",
                                                 "target_sparsity": 0.1, "drop_layers": drop}, student=None)
        with pytest.raises(ConfigError, match=match):
            check_inheritances(cfg)


def test_towers_vision_prunes_the_vision_tower_alone_to_its_target(teacher):
    student = ImportanceInheritance(0.5, criterion="magnitude", towers="vision").inherit(None, teacher)
    assert achieved(student, teacher, ("vision",)) == pytest.approx(0.5, abs=0.02)
    assert achieved(student, teacher, ("text",)) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(get_tower(student, "text").blocks[0].state_dict().values(),
                                                 get_tower(teacher, "text").blocks[0].state_dict().values(),
                                                 strict=True))


def test_the_engine_draws_calibration_batches_of_them_and_none_with_scores_from(tmp_path, monkeypatch, teacher):
    import compress.stage as stage

    drawn = []
    monkeypatch.setattr(stage, "calibration_batches", lambda run, count, device: drawn.append(count) or
                        [batch(seed=k) for k in range(count)])
    cfg = tiny_config(tmp_path)
    run = stage.StageRun(cfg, tmp_path / "a", None, teacher, cfg.seed)
    stage.prepare_inheritance(run, ImportanceInheritance(0.3, criterion="activation", calibration_batches=3))
    assert drawn == [3]
    scores = tmp_path / "a" / "importance" / "scores.safetensors"
    reuse = ImportanceInheritance(0.5, criterion="activation", scores_from=str(scores))
    stage.prepare_inheritance(stage.StageRun(cfg, tmp_path / "b", None, teacher, cfg.seed), reuse)
    assert drawn == [3] and reuse.scores is not None


def test_a_rank_other_than_0_never_scores_it_reads_rank_0s_file_strictly(teacher, tmp_path, monkeypatch):
    def no_batches():
        raise AssertionError("calibration batches were drawn")

    monkeypatch.setattr("compress.distributed.SHARED_FILE_WAIT_S", 0.2)
    path = tmp_path / "importance" / "scores.safetensors"
    with pytest.raises(ValueError, match=f"no scores file at {path} on this rank after 0 s.*shared by all ranks"):
        ImportanceInheritance(0.3, criterion="activation", calibration_batches=1).prepare(
            Calibration(no_batches, path, torch.device("cpu"), main=False), teacher)
    ImportanceInheritance(0.3, criterion="activation", calibration_batches=1).prepare(
        Calibration(lambda: [batch()], path, torch.device("cpu")), teacher)
    other = ImportanceInheritance(0.3, criterion="activation", calibration_batches=1)
    other.prepare(Calibration(no_batches, path, torch.device("cpu"), main=False), teacher)
    assert other.scores is not None
    with pytest.raises(ValueError, match="the scores rank 0 wrote at .*batches differ"):
        ImportanceInheritance(0.3, criterion="activation", calibration_batches=2).prepare(
            Calibration(no_batches, path, torch.device("cpu"), main=False), teacher)


def test_a_rank_waits_for_a_scores_file_its_node_sees_late(tmp_path):
    """A shared file system may show rank 0's file on another node only after its directory cache expires: the
    other ranks poll for it (up to SHARED_FILE_WAIT_S) instead of failing at once."""
    import threading

    from compress.distributed import wait_for_shared_file

    path = tmp_path / "importance" / "scores.safetensors"
    path.parent.mkdir()
    assert not wait_for_shared_file(path, timeout_s=0.1, poll_s=0.05)
    writer = threading.Timer(0.3, path.write_bytes, args=(b"x",))
    writer.start()
    try:
        assert wait_for_shared_file(path, timeout_s=10, poll_s=0.05)
    finally:
        writer.join()


def test_kept_scores_of_another_micro_batch_size_or_world_size_are_not_reused(teacher, tmp_path):
    def no_batches():
        raise AssertionError("calibration batches were drawn")

    path = tmp_path / "importance" / "scores.safetensors"

    def calibration(batches, micro_batch, world_size):
        return Calibration(batches, path, torch.device("cpu"), micro_batch=micro_batch, world_size=world_size)

    ImportanceInheritance(0.3, criterion="activation", calibration_batches=1).prepare(
        calibration(lambda: [batch()], 4, 1), teacher)
    same = ImportanceInheritance(0.3, criterion="activation", calibration_batches=1)
    same.prepare(calibration(no_batches, 4, 1), teacher)  # the same layout: read, not drawn
    for micro_batch, world_size in ((8, 1), (4, 2)):
        with pytest.raises(AssertionError, match="drawn"):
            ImportanceInheritance(0.3, criterion="activation", calibration_batches=1).prepare(
                calibration(no_batches, micro_batch, world_size), teacher)


def test_scores_from_is_checked_when_the_config_is_read(teacher, tmp_path, monkeypatch):
    from compress.config import ConfigError

    path = tmp_path / "importance" / "scores.safetensors"
    ImportanceInheritance(0.3, criterion="magnitude").prepare(
        Calibration(lambda: [], path, torch.device("cpu")), teacher)
    readme = tmp_path / "README.md"
    readme.write_text("# not scores\n")
    with pytest.raises(ValueError, match=f"{readme} is not a scores file"):
        ImportanceInheritance(0.3, criterion="magnitude", scores_from=str(readme))
    with pytest.raises(ValueError, match="calibration_batches has no effect with scores_from"):
        ImportanceInheritance(0.3, criterion="taylor", calibration_batches=8, scores_from=str(path))
    monkeypatch.chdir(tmp_path)
    relative = ImportanceInheritance(0.3, criterion="magnitude", scores_from="importance/scores.safetensors")
    assert relative.scores_from == str(path.resolve())
    # a stage sourced from the previous stage's student: the strategy binds scores_from to one source (refused)
    spec = {"name": "importance", "criterion": "magnitude", "scores_from": str(path)}
    with pytest.raises(ConfigError, match=r"stages\[1\]\.inheritance\.scores_from: this stage's source is the prev"):
        tiny_config(tmp_path, inheritance=spec, student=None, stages={"targets": [0.2, 0.4]}, eval=NO_EVAL)
    tiny_config(tmp_path, inheritance=spec, student=None, eval=NO_EVAL)  # from the teacher: accepted


def test_an_unreachable_target_is_refused_naming_the_most_that_can_go(teacher, tmp_path):
    from compress.config import ConfigError
    from compress.plan.build import check_inheritances

    with pytest.raises(ValueError, match=r"widths uniform can remove at most 255,936 \(61\.1%\): only MLP neurons"):
        ImportanceInheritance(0.9, criterion="magnitude", widths="uniform").inherit(None, teacher)
    with pytest.raises(ValueError, match=r"widths per_layer can remove at most 355,392 \(84\.9%\)"):
        ImportanceInheritance(0.9, criterion="magnitude").check(None, teacher)
    ImportanceInheritance(0.6, criterion="magnitude", widths="uniform").check(None, teacher)  # within reach
    # the dry run: a stage sourced from the previous stage is checked at its cumulative target from the teacher
    spec = {"name": "importance", "criterion": "magnitude", "widths": "uniform"}
    with pytest.raises(ConfigError, match=r"stages\[2\]\.inheritance \(its cumulative target.*at most 255,936"):
        check_inheritances(tiny_config(tmp_path, inheritance=spec, student=None, stages={"targets": [0.2, 0.4, 0.7]},
                                       eval=NO_EVAL))
    check_inheritances(tiny_config(tmp_path, inheritance=spec, student=None, stages={"targets": [0.2, 0.4, 0.6]},
                                   eval=NO_EVAL))
