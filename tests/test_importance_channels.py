"""``importance`` inheritance with ``channels: prune`` (issue 20, residual channels): the channel scores against
formulas computed here, the export against the source sliced here and run through a forward written here, the
budget, the default leaving the width (and the run ids), and the refusals."""

import copy
import json

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

from compress.models import load_model
from compress.models.structure import TowerKeep
from compress.models.towers import get_tower
from compress.plan import build_plan, format_plan
from compress.recipe import run_id_of
from compress.run import run_dir_for, run_experiment
from strategies.inheritance.importance import ImportanceInheritance, prune_kept
from strategies.inheritance.importance_scores import (
    activation_scores,
    magnitude_scores,
    real_text_tokens,
    taylor_scores,
)
from tests.test_importance_inheritance import NO_EVAL, achieved, assert_resumes_exactly, batch
from tests.test_resume import TRAIN
from tests.test_run_e2e import tiny_config

TOWERS = ("vision", "text")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return load_model("cc-test-teacher").eval()


def residual_tensors(model, name):
    """(tensor, channel axis) of every weight of a tower that reads or writes the residual stream (no biases)."""
    if name == "vision":
        v = model.visual
        out = [(v.conv1.weight, 0), (v.class_embedding, 0), (v.positional_embedding, 1), (v.ln_pre.weight, 0),
               (v.ln_post.weight, 0), (v.proj, 0)]
        blocks = v.transformer.resblocks
    else:
        out = [(model.token_embedding.weight, 1), (model.positional_embedding, 1), (model.ln_final.weight, 0),
               (model.text_projection, 0)]
        blocks = model.transformer.resblocks
    for b in blocks:
        out += [(b.ln_1.weight, 0), (b.ln_2.weight, 0), (b.attn.in_proj_weight, 1), (b.attn.out_proj.weight, 0),
                (b.mlp.c_fc.weight, 1), (b.mlp.c_proj.weight, 0)]
    return out


def per_channel(t, axis):
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1)


def test_magnitude_channel_scores_are_the_sum_of_squares_over_every_residual_tensor(teacher):
    scores = magnitude_scores(teacher, TOWERS)
    for name in TOWERS:
        expected = sum(per_channel(t.detach().pow(2), axis) for t, axis in residual_tensors(teacher, name))
        torch.testing.assert_close(scores[f"{name}/channels"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_taylor_channel_scores_are_the_sum_of_abs_weight_times_gradient(teacher):
    model = copy.deepcopy(teacher).requires_grad_(False)
    scores = taylor_scores(model, TOWERS, [batch()], torch.device("cpu"))
    ref = copy.deepcopy(teacher).requires_grad_(True)
    b = batch()
    image = F.normalize(ref.encode_image(b["images"]), dim=-1)
    text = F.normalize(ref.encode_text(b["texts"]), dim=-1)
    logits = ref.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    for name in TOWERS:
        expected = sum(per_channel((t * t.grad).abs().detach(), axis) for t, axis in residual_tensors(ref, name))
        torch.testing.assert_close(scores[f"{name}/channels"], expected, rtol=1e-4, atol=1e-8)


def test_activation_channel_scores_are_minitrons_mean_abs_layernorm_output_summed_over_norms(teacher):
    b = batch()
    scores = activation_scores(teacher, TOWERS, [b], torch.device("cpu"))
    norms = [teacher.ln_final] + [m for blk in teacher.transformer.resblocks for m in (blk.ln_1, blk.ln_2)]
    outputs = []
    hooks = [n.register_forward_hook(lambda m, a, out: outputs.append(out)) for n in norms]
    with torch.no_grad():
        teacher.encode_text(b["texts"])
    for h in hooks:
        h.remove()
    assert len(outputs) == 9
    real = real_text_tokens(b["texts"])  # up to each text's end-of-text token, as the heads' and neurons' scores
    assert not real.all()
    expected = sum((y if y.shape[:2] == real.shape else y.transpose(0, 1))[real].abs().mean(0) for y in outputs)
    torch.testing.assert_close(scores["text/channels"], expected, rtol=1e-4, atol=1e-6)


# -- an independent forward on independently sliced weights ------------------------------------------------
def sliced_block(blk, ch, heads, neurons, d):
    """The weights of one block on kept residual channels ``ch``, heads and neurons, by plain indexing."""
    inner = blk.attn.num_heads * d
    rows = torch.cat([torch.arange(q * inner + h * d, q * inner + (h + 1) * d) for q in range(3) for h in heads])
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    return {"ln_1": (blk.ln_1.weight[ch], blk.ln_1.bias[ch]), "ln_2": (blk.ln_2.weight[ch], blk.ln_2.bias[ch]),
            "qkv": (blk.attn.in_proj_weight[rows][:, ch], blk.attn.in_proj_bias[rows]),
            "out": (blk.attn.out_proj.weight[ch][:, cols], blk.attn.out_proj.bias[ch]),
            "fc": (blk.mlp.c_fc.weight[neurons][:, ch], blk.mlp.c_fc.bias[neurons]),
            "proj": (blk.mlp.c_proj.weight[ch][:, neurons], blk.mlp.c_proj.bias[ch]), "heads": len(heads)}


def run_blocks(x, blocks, d, causal):
    for w in blocks:
        y = F.layer_norm(x, x.shape[-1:], *w["ln_1"])
        q, k, v = F.linear(y, *w["qkv"]).chunk(3, dim=-1)
        split = [t.reshape(*t.shape[:2], w["heads"], d).transpose(1, 2) for t in (q, k, v)]
        att = split[0] @ split[1].transpose(-1, -2) / d ** 0.5
        if causal:
            att = att.masked_fill(torch.ones(att.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        o = (att.softmax(-1) @ split[2]).transpose(1, 2).reshape(*x.shape[:2], -1)
        x = x + F.linear(o, *w["out"])
        y = F.layer_norm(x, x.shape[-1:], *w["ln_2"])
        x = x + F.linear(F.gelu(F.linear(y, *w["fc"])), *w["proj"])
    return x


def reference_image(model, keep, images):
    v, ch, d = model.visual, keep.channels, 16
    blocks = [sliced_block(b, ch, h.tolist(), n, d) for b, h, n in
              zip(v.transformer.resblocks, keep.heads, keep.neurons, strict=True)]
    x = F.conv2d(images, v.conv1.weight[ch], stride=v.conv1.stride).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding[ch].expand(len(x), 1, -1), x], dim=1) + v.positional_embedding[:, ch]
    x = run_blocks(F.layer_norm(x, x.shape[-1:], v.ln_pre.weight[ch], v.ln_pre.bias[ch]), blocks, d, causal=False)
    return F.layer_norm(x[:, 0], x.shape[-1:], v.ln_post.weight[ch], v.ln_post.bias[ch]) @ v.proj[ch]


def reference_text(model, keep, texts):
    ch, d = keep.channels, 16
    blocks = [sliced_block(b, ch, h.tolist(), n, d) for b, h, n in
              zip(model.transformer.resblocks, keep.heads, keep.neurons, strict=True)]
    x = run_blocks(model.token_embedding.weight[texts][..., ch] + model.positional_embedding[:, ch], blocks, d,
                   causal=True)
    x = F.layer_norm(x, x.shape[-1:], model.ln_final.weight[ch], model.ln_final.bias[ch])
    return x[torch.arange(len(x)), texts.argmax(-1)] @ model.text_projection[ch]


def test_the_export_with_pruned_channels_equals_the_source_sliced_independently(teacher):
    g = torch.Generator().manual_seed(5)
    keep = {}
    for name in TOWERS:
        keep[name] = TowerKeep(channels=torch.sort(torch.randperm(64, generator=g)[:40]).values,
                               heads=[torch.sort(torch.randperm(4, generator=g)[:k]).values for k in (4, 2, 3, 1)],
                               neurons=[torch.sort(torch.randperm(256, generator=g)[:n]).values
                                        for n in (256, 100, 64, 8)])
    student = prune_kept(copy.deepcopy(teacher), keep).eval()
    assert student.clip_structure["vision"]["width"] == 40 == student.clip_structure["text"]["width"]
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(b["images"]), reference_image(teacher, keep["vision"],
                                                                                      b["images"]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(student.encode_text(b["texts"]), reference_text(teacher, keep["text"], b["texts"]),
                                   rtol=1e-5, atol=1e-5)


def test_the_selected_student_equals_the_source_sliced_on_its_kept_channels(teacher):
    """The strategy's own choice, end to end: the kept channels are the best-scored ones in chunks of round_to."""
    strategy = ImportanceInheritance(0.5, criterion="magnitude", channels="prune")
    student = strategy.inherit(None, teacher).eval()
    scores = magnitude_scores(teacher, TOWERS)
    b = batch()
    for name, encode, ref, x in (("vision", student.encode_image, reference_image, b["images"]),
                                 ("text", student.encode_text, reference_text, b["texts"])):
        width = student.clip_structure[name]["width"]
        assert width < 64 and width % 8 == 0
        kept = torch.sort(torch.argsort(scores[f"{name}/channels"], descending=True, stable=True)[:width]).values
        tower = get_tower(student, name)
        # the heads and neurons kept are read from the export's own weights: its channels are what is checked here
        src_blocks = get_tower(teacher, name).blocks
        heads = [kept_rows(s.attn.out_proj.weight[kept].T.reshape(4, -1),
                           blk.attn.out_proj.weight.T.reshape(int(blk.attn.num_heads), -1))
                 for s, blk in zip(src_blocks, tower.blocks, strict=True)]
        neurons = [kept_rows(s.mlp.c_fc.weight[:, kept], blk.mlp.c_fc.weight)
                   for s, blk in zip(src_blocks, tower.blocks, strict=True)]
        keep = TowerKeep(channels=kept, heads=heads, neurons=neurons)
        with torch.no_grad():
            torch.testing.assert_close(encode(x), ref(teacher, keep, x), rtol=1e-5, atol=1e-5)


def kept_rows(source_rows, kept_rows_):
    """The index in ``source_rows`` of each row of ``kept_rows_`` (exact copies)."""
    return torch.tensor([int(torch.where((source_rows == r).all(1))[0][0]) for r in kept_rows_])


@pytest.mark.parametrize("budget", ["pooled", "per_tower"])
def test_the_budget_is_reached_within_rounding_with_channels_pruned(teacher, budget):
    student = ImportanceInheritance(0.5, criterion="magnitude", budget=budget, channels="prune").inherit(None, teacher)
    assert achieved(student, teacher) == pytest.approx(0.5, abs=0.02)
    for name in TOWERS:
        assert student.clip_structure[name]["width"] % 8 == 0
        if budget == "per_tower":
            assert achieved(student, teacher, (name,)) == pytest.approx(0.5, abs=0.03)
    assert any(student.clip_structure[name]["width"] < 64 for name in TOWERS)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_uniform_widths_with_channels_drop_a_head_per_layer_per_head_dim_and_load_in_plain_open_clip(teacher, target):
    """open_clip ties width to heads x head dim: the export keeps the best-scored width = heads x 16 channels, each
    layer its best-scored heads, one MLP width, and open_clip builds it from its config alone."""
    student = ImportanceInheritance(target, criterion="magnitude", widths="uniform", channels="prune").inherit(
        None, teacher).eval()
    scores = magnitude_scores(teacher, TOWERS)
    assert achieved(student, teacher) == pytest.approx(target, abs=0.02)
    for name in TOWERS:
        t = student.clip_structure[name]
        assert len(set(t["heads"])) == 1 and t["heads"][0] * 16 == t["width"] and len(set(t["mlp_width"])) == 1
        assert t["mlp_width"][0] % 8 == 0
        kept = torch.sort(torch.argsort(scores[f"{name}/channels"], descending=True, stable=True)[:t["width"]]).values
        ln = get_tower(student, name).blocks[0].ln_1.weight
        torch.testing.assert_close(ln, get_tower(teacher, name).blocks[0].ln_1.weight[kept])
    assert student.clip_structure["vision"]["width"] < 64 and student.clip_cfg["vision_cfg"]["width"] < 64
    plain = open_clip.CLIP(**student.clip_cfg).eval()
    plain.load_state_dict(student.state_dict(), strict=True)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(b["images"]), student.encode_image(b["images"]))
        torch.testing.assert_close(plain.encode_text(b["texts"]), student.encode_text(b["texts"]))


def test_channels_keep_is_the_default_leaves_the_width_and_the_run_id(teacher, tmp_path):
    default = ImportanceInheritance(0.5, criterion="magnitude").inherit(None, teacher)
    written = ImportanceInheritance(0.5, criterion="magnitude", channels="keep").inherit(None, teacher)
    assert all(default.clip_structure[n]["width"] == 64 for n in TOWERS)
    assert default.clip_structure == written.clip_structure
    spec = {"name": "importance", "criterion": "magnitude"}
    ids = [run_id_of(tiny_config(tmp_path, inheritance={**spec, **extra}, student=None))
           for extra in ({}, {"channels": "keep"}, {"channels": "prune"})]
    assert ids[0] == ids[1] != ids[2]


def test_the_dry_run_names_the_channels(tmp_path):
    cfg = tiny_config(tmp_path, inheritance={"name": "importance", "criterion": "magnitude", "channels": "prune"},
                      student=None)
    text = format_plan(build_plan(cfg))
    assert "neurons and residual channels rounded to 8" in text
    assert "residual channels ranked with them, in chunks of 8" in text


def test_refusals(teacher, tmp_path):
    with pytest.raises(ValueError, match="channels must be one of"):
        ImportanceInheritance(channels="half")
    with pytest.raises(ValueError, match="moves the vision width by its head dim"):
        ImportanceInheritance(0.5, criterion="magnitude", channels="prune", widths="uniform", round_to=32).inherit(
            None, teacher)
    with pytest.raises(ValueError, match="no multiple of it"):
        ImportanceInheritance(0.5, criterion="magnitude", channels="prune", round_to=48).inherit(None, teacher)
    strategy = ImportanceInheritance(0.5, criterion="magnitude")
    old = {k: v.contiguous() for k, v in magnitude_scores(teacher, TOWERS).items() if not k.endswith("/channels")}
    path = tmp_path / "scores.safetensors"
    save_file(old, str(path), metadata={"key": json.dumps(strategy.score_key(teacher), sort_keys=True)})
    with pytest.raises(ValueError, match="no vision/channels, text/channels scores"):
        ImportanceInheritance(0.5, criterion="magnitude", channels="prune", scores_from=str(path)).prepare(
            None, teacher)


@pytest.mark.slow
def test_a_two_stage_uniform_run_with_channels_pruned_resumes_exactly(tmp_path, monkeypatch):
    """Through the engine: activation scores on calibration batches (channel scores in the stage's scores file),
    each stage's plain open_clip export narrower than its source, a stop in the second stage resumed exactly."""
    def cfg(out):
        spec = {"name": "importance", "criterion": "activation", "calibration_batches": 2, "widths": "uniform",
                "channels": "prune"}
        return tiny_config(tmp_path, inheritance=spec, student=None, stages={"targets": [0.3, 0.6]}, train=TRAIN,
                           eval=NO_EVAL, output={"dir": str(tmp_path / out)})

    straight = cfg("straight")
    assert run_experiment(straight)["status"] == "completed"
    stages = sorted((run_dir_for(straight) / "stages").iterdir())
    assert [s.name for s in stages] == ["0-sparsity30", "1-sparsity60"]
    for stage in stages:
        with safe_open(str(stage / "importance" / "scores.safetensors"), framework="pt") as f:
            assert {"vision/channels", "text/channels"} <= set(f.keys())
    last = json.loads((stages[-1] / "result.json").read_text())["metrics"]
    assert last["sparsity/achieved"] == pytest.approx(0.6, abs=0.02)
    final = load_model(last["export/path"])
    assert final.clip_cfg["vision_cfg"]["width"] < 64 or final.clip_cfg["text_cfg"]["width"] < 64
    resumed = cfg("runs")
    assert_resumes_exactly(monkeypatch, resumed, straight, "1-sparsity60", 5)
