"""Evaluation: zero-shot accuracy and classifier, retrieval recall@k, MACs, throughput,
evaluate_model. Fake models give designed features, so every expected number is known."""

from __future__ import annotations

import contextlib
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.evaluation import (
    RetrievalSet,
    ZeroShotTask,
    count_macs,
    evaluate_model,
    recall_at_k,
    retrieval_recall,
    text_identities,
    throughput,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from compress.models import HeadAttention, build_from_config, convert_attention, get_model_config, load_model


class AngleModel(nn.Module):
    """Images and "tokens" are angles [B, 1] (or [B, K, 1]); features are (cos, sin), so the
    similarity cos(a - b) falls with the angular distance |a - b| (< pi here)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _embed(angles: Tensor) -> Tensor:
        a = angles.reshape(-1).double()
        return torch.stack([a.cos(), a.sin()], dim=1).float()

    def encode_image(self, images: Tensor) -> Tensor:
        return self._embed(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self._embed(tokens)


def _batches(images: list[float], texts: list[float], splits: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
    """Loader batches: ``splits`` = numbers of (images, texts) per batch."""
    out, i, t = [], 0, 0
    for ni, nt in splits:
        out.append((torch.tensor(images[i : i + ni]).view(-1, 1), torch.tensor(texts[t : t + nt]).view(-1, 1)))
        i, t = i + ni, t + nt
    return out


# --- retrieval ---------------------------------------------------------------------------

# 10 images at 0, 0.1, ..., 0.9 rad. Texts 0-5 sit 0.01 past their image (rank 0 both ways);
# text 6 at 0.72 (its image ranks 3rd for it; for image 6, text 5 at 0.51 is nearer:
# rank 2nd); texts 7-9 far away at -1.0, -1.01, -1.02 (ranks 8th, 9th, 10th both ways).
PAIR_IMAGES = [0.1 * i for i in range(10)]
PAIR_TEXTS = [0.01, 0.11, 0.21, 0.31, 0.41, 0.51, 0.72, -1.0, -1.01, -1.02]
PAIR_EXPECTED = {
    "i2t_r1": 60.0, "i2t_r2": 70.0, "i2t_r5": 70.0, "i2t_r10": 100.0,
    "t2i_r1": 60.0, "t2i_r2": 60.0, "t2i_r5": 70.0, "t2i_r10": 100.0,
}  # fmt: skip


def test_retrieval_pairs_known_recall() -> None:
    loader = _batches(PAIR_IMAGES, PAIR_TEXTS, [(3, 3), (3, 3), (4, 4)])
    got = retrieval_recall(AngleModel(), loader, ks=(1, 2, 5, 10), chunk_size=3)
    assert got == pytest.approx(PAIR_EXPECTED)


# 4 images at 0, 0.1, 0.2, 0.3 with two captions each (angle, image):
#   (0.001, 0) (-1.0, 0) (0.31, 1) (0.12, 1) (0.33, 2) (0.36, 2) (-0.5, 3) (1.2, 3)
# image->text rank of the best caption: img0 0, img1 0, img2 2 (0.12, 0.31 nearer), img3 5
# text->image rank: 0, 0, 2, 0, 1, 1, 3, 0
CAPTIONS = [(0.001, 0), (-1.0, 0), (0.31, 1), (0.12, 1), (0.33, 2), (0.36, 2), (-0.5, 3), (1.2, 3)]
MULTI_EXPECTED = {
    "i2t_r1": 50.0, "i2t_r2": 50.0, "i2t_r5": 75.0, "i2t_r10": 100.0,
    "t2i_r1": 50.0, "t2i_r2": 75.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
}  # fmt: skip


def test_retrieval_multi_caption_explicit_mapping() -> None:
    order = [2, 0, 5, 7, 1, 3, 6, 4]  # texts shuffled, batches of unequal image/text counts
    texts = [CAPTIONS[j][0] for j in order]
    mapping = [CAPTIONS[j][1] for j in order]
    loader = _batches([0.0, 0.1, 0.2, 0.3], texts, [(2, 3), (2, 5)])
    got = retrieval_recall(AngleModel(), loader, ks=(1, 2, 5, 10), text_to_image=mapping, chunk_size=3)
    assert got == pytest.approx(MULTI_EXPECTED)
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(AngleModel(), loader)


def test_retrieval_multi_caption_per_image_tokens() -> None:
    """Tokens [B, K, L]: K captions per image, no mapping needed."""
    per_image = torch.tensor([a for a, _ in CAPTIONS]).view(4, 2, 1)
    images = torch.tensor([0.0, 0.1, 0.2, 0.3]).view(4, 1)
    loader = [(images[:2], per_image[:2]), (images[2:], per_image[2:])]
    got = retrieval_recall(AngleModel(), loader, ks=(1, 2, 5, 10))
    assert got == pytest.approx(MULTI_EXPECTED)


def test_recall_images_without_captions_left_out_of_i2t() -> None:
    # image 2 has no caption; text 0 -> image 0 (exact), text 1 -> image 1 but closest to image 2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = F.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), dim=-1)
    got = recall_at_k(img, txt, [0, 1], ks=(1, 2))
    assert got == pytest.approx({"i2t_r1": 100.0, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0})
    with pytest.raises(ValueError, match="index"):
        recall_at_k(img, txt, [0, 3])


class TokenAngleModel(AngleModel):
    """Texts are token ids [N, L] (long); a text's angle is ``WORD_ANGLES[first token]``, so
    identical token rows give identical (exactly tied) features."""

    WORD_ANGLES = torch.tensor([0.0, 0.04, 0.21, 0.6])

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self._embed(self.WORD_ANGLES[tokens[:, 0]])


# 4 images at 0, 0.1, 0.2, 0.3; captions as token ids: images 0 and 1 both "red circle" (id 1 at
# 0.04), image 2 "blue square" (0.21), image 3 "green star" (0.6). Image->text: images 0 and 1 both
# see the two identical texts tied first; either is a caption of theirs, so both hit (3 of 4 images
# hit at R@1; image 3's own caption ranks 4th). Row identity would credit only the one of the pair
# topk happens to put first: 2 of 4. Text->image: both "red circle" texts find image 0 first, which
# has that caption: all 4 texts hit (row identity: text 1 misses).
DUP_TOKENS = torch.tensor([[1, 9], [1, 9], [2, 9], [3, 9]])
DUP_IMAGES = torch.tensor([0.0, 0.1, 0.2, 0.3]).view(4, 1)
DUP_EXPECTED = {"i2t_r1": 75.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0}


def test_retrieval_identical_captions_count_as_correct() -> None:
    got = retrieval_recall(TokenAngleModel(), [(DUP_IMAGES[:3], DUP_TOKENS[:3]), (DUP_IMAGES[3:], DUP_TOKENS[3:])],
                           ks=(1, 5))
    assert got == pytest.approx(DUP_EXPECTED)
    # the answer does not depend on which of the tied texts comes first
    order = [1, 0, 2, 3]
    swapped = retrieval_recall(TokenAngleModel(), [(DUP_IMAGES, DUP_TOKENS[order])], ks=(1, 5),
                               text_to_image=[1, 0, 2, 3])
    assert swapped == pytest.approx(DUP_EXPECTED)
    # row identity (no text ids): one of the two "red circle" images misses, in either direction
    img = F.normalize(AngleModel._embed(DUP_IMAGES), dim=-1)
    txt = F.normalize(TokenAngleModel().encode_text(DUP_TOKENS), dim=-1)
    strict = recall_at_k(img, txt, [0, 1, 2, 3], ks=(1,))
    assert strict == pytest.approx({"i2t_r1": 50.0, "t2i_r1": 75.0})
    ids = text_identities(DUP_TOKENS)
    assert ids.tolist()[0] == ids.tolist()[1] and len(set(ids.tolist())) == 3
    with_ids = recall_at_k(img, txt, [0, 1, 2, 3], ks=(1,), text_ids=ids)
    assert with_ids == pytest.approx({"i2t_r1": 75.0, "t2i_r1": 100.0})
    # both rules from one pass: the set rule's keys and clip_benchmark's row rule under row/
    both = recall_at_k(img, txt, [0, 1, 2, 3], ks=(1,), text_ids=ids, row_rule=True)
    assert both == pytest.approx({"i2t_r1": 75.0, "t2i_r1": 100.0, "row/i2t_r1": 50.0, "row/t2i_r1": 75.0})


def test_recall_refuses_no_images_or_no_texts() -> None:
    img, txt = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(2, 4), dim=-1)
    with pytest.raises(ValueError, match="got 3 images and 0 texts"):
        recall_at_k(img, txt[:0], [])
    with pytest.raises(ValueError, match="got 0 images and 2 texts"):
        recall_at_k(img[:0], txt, [0, 0])


def test_retrieval_batches_with_any_number_of_captions_per_image() -> None:
    """A dict batch's ``text_image`` (clip_benchmark retrieval sets: a list of captions per image)."""
    batches = [
        {"images": DUP_IMAGES[:2], "texts": DUP_TOKENS[[0, 3, 1]], "text_image": torch.tensor([0, 0, 1])},
        {"images": DUP_IMAGES[2:], "texts": DUP_TOKENS[[2]], "text_image": torch.tensor([0])},
    ]
    # image 3 has no caption (left out of image->text); image 0 has "red circle" and "green star"
    got = retrieval_recall(TokenAngleModel(), batches, ks=(1,))
    assert got == pytest.approx({"i2t_r1": 100.0, "t2i_r1": 75.0})


def test_recall_chunking_matches_full_matrix() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(37, 8), dim=-1)
    txt = F.normalize(torch.randn(90, 8), dim=-1)
    mapping = torch.randint(0, 37, (90,))
    assert recall_at_k(img, txt, mapping, chunk_size=7) == recall_at_k(img, txt, mapping, chunk_size=10_000)


# --- zero-shot ---------------------------------------------------------------------------


class ScoreModel(nn.Module):
    """``encode_image`` returns the image tensor itself: with an identity classifier the
    features ARE the class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, images: Tensor) -> Tensor:
        return images


def _scores_ranking(label: int, rank: int, num_classes: int) -> Tensor:
    """A positive score vector over classes in which ``label`` is ranked ``rank`` (0 = first)."""
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank] + [label] + others[rank:]
    scores = torch.empty(num_classes)
    for position, c in enumerate(order):
        scores[c] = float(num_classes - position)
    return scores


def test_zero_shot_accuracy_known_predictions() -> None:
    # (true label, rank of the true label among 6 classes)
    samples = [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2), (5, 4), (0, 5), (1, 0), (2, 3), (3, 5)]
    images = torch.stack([_scores_ranking(y, r, 6) for y, r in samples])
    labels = torch.tensor([y for y, _ in samples])
    loader = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, 10, 3)]
    subsets = {"heldout": {0, 1}, "seen": {2, 3, 4, 5}}
    got = zero_shot_accuracy(ScoreModel(), torch.eye(6), loader, label_subsets=subsets)
    # top-1: ranks 0 at samples 0, 1, 2, 7 -> 4/10; top-5: rank < 5 except samples 6, 9 -> 8/10
    # heldout (labels 0, 1: samples 0, 1, 6, 7): top-1 3/4, top-5 3/4
    # seen (samples 2, 3, 4, 5, 8, 9): top-1 1/6, top-5 5/6
    expected = {
        "top1": 40.0, "top5": 80.0,
        "top1_heldout": 75.0, "top5_heldout": 75.0,
        "top1_seen": 100 / 6, "top5_seen": 500 / 6,
        # per-class top-1 recall: class 0 1/2, 1 2/2, 2 1/2, 3 0/2, 4 0/1, 5 0/1 -> mean 2/6
        "mean_per_class_recall": 100 / 3,
    }  # fmt: skip
    assert got == pytest.approx(expected)


def test_zero_shot_accuracy_dict_batches_and_few_classes() -> None:
    samples = [(0, 0), (1, 1), (2, 0), (2, 2)]
    images = torch.stack([_scores_ranking(y, r, 3) for y, r in samples])
    loader = [{"images": images, "labels": torch.tensor([y for y, _ in samples])}]
    got = zero_shot_accuracy(ScoreModel(), torch.eye(3), loader, label_subsets={"none": set()})
    assert set(got) == {"top1", "top1_none", "mean_per_class_recall"}  # no top-5 with 3 classes
    assert got["top1"] == pytest.approx(50.0)
    assert got["mean_per_class_recall"] == pytest.approx(100 * (1 + 0 + 0.5) / 3)  # classes 0, 1, 2
    assert math.isnan(got["top1_none"])


def test_mean_per_class_recall_is_sklearns_balanced_accuracy() -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn comes with the eval extra")
    torch.manual_seed(0)
    logits, labels = torch.randn(300, 7), torch.randint(0, 6, (300,))  # class 6 never a true label
    loader = [(logits[i : i + 64], labels[i : i + 64]) for i in range(0, 300, 64)]
    got = zero_shot_accuracy(ScoreModel(), torch.eye(7), loader)
    expected = metrics.balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy())
    assert got["mean_per_class_recall"] == pytest.approx(100 * expected)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return load_model("cc-test-teacher")


def _tokenizer(context_length: int = 16) -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def test_zero_shot_classifier_is_mean_of_normalised_template_embeddings(tiny: nn.Module) -> None:
    tokenizer = _tokenizer()
    classnames = ["red circle", "blue square", "green triangle"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    got = zero_shot_classifier(tiny, tokenizer, classnames, templates, num_classes_per_batch=2)
    columns = []
    with torch.no_grad():
        for name in classnames:
            emb = tiny.encode_text(tokenizer([t.format(name) for t in templates]))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            columns.append(mean / mean.norm())
    expected = torch.stack(columns, dim=1)
    assert got.shape == (32, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(3))


# --- MACs --------------------------------------------------------------------------------


class LinearCLIP(nn.Module):
    """Image: flatten [1, 3, 2, 2] -> Linear(12, 5); text: one-hot [1, 4] float -> Linear(4, 3, bias=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(12, 5)
        self.visual.image_size = 2
        self.text = nn.Linear(4, 3, bias=False)
        self.context_length = 4

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images.flatten(1))

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text(tokens.float())


def test_macs_hand_count_linear() -> None:
    model = LinearCLIP()
    # aten: matmul MACs only, biases not counted
    assert count_macs(model) == {"macs_image": 12 * 5, "macs_text": 4 * 3}
    # torch-pruning's ptflops convention adds one op per output feature for a bias
    assert count_macs(model, counter="torch_pruning") == {"macs_image": 12 * 5 + 5, "macs_text": 4 * 3}


def _vit_tower_macs(cfg: dict) -> int:
    """Hand count of a ViT image tower: patch conv, per layer qkv + scores + weighted sum +
    out proj + MLP, final projection (class-token pooling)."""
    v = cfg["vision_cfg"]
    d, p, size, layers = v["width"], v["patch_size"], v["image_size"], v["layers"]
    patches = (size // p) ** 2
    n = patches + 1
    mlp = int(d * v.get("mlp_ratio", 4.0))
    per_layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * mlp
    return patches * d * 3 * p * p + layers * per_layer + d * cfg["embed_dim"]


def _text_tower_macs(cfg: dict) -> int:
    t = cfg["text_cfg"]
    d, n, layers = t["width"], t["context_length"], t["layers"]
    per_layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
    return layers * per_layer + d * cfg["embed_dim"]  # projection of the end-of-text token only


def test_macs_tiny_vit_hand_count(tiny: nn.Module) -> None:
    cfg = tiny.clip_cfg
    assert count_macs(tiny) == {"macs_image": _vit_tower_macs(cfg), "macs_text": _text_tower_macs(cfg)}


@pytest.mark.parametrize("counter", ["aten", "torch_pruning"])
def test_macs_converted_equal_unconverted(counter: str) -> None:
    torch.manual_seed(0)
    original = build_from_config(get_model_config("cc-test-teacher"), convert=False).eval()
    converted = convert_attention(copy.deepcopy(original))
    assert any(isinstance(m, HeadAttention) for m in converted.modules())
    assert count_macs(converted, counter=counter) == count_macs(original, counter=counter)


def test_macs_shrink_with_fewer_heads(tiny: nn.Module) -> None:
    """A layer whose attention lost half its heads: the qkv, score and output-projection MACs
    shrink by exactly half of that layer's attention MACs (both counters see HeadAttention)."""
    cfg = tiny.clip_cfg["vision_cfg"]
    d, n = cfg["width"], (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    pruned = copy.deepcopy(tiny)
    block = pruned.visual.transformer.resblocks[0]
    old: HeadAttention = block.attn
    new = HeadAttention(d, old.num_heads // 2, old.head_dim)
    block.attn = new
    inner_lost = old.inner_dim - new.inner_dim
    attention_macs_lost = n * d * 3 * inner_lost + 2 * n * n * inner_lost + n * inner_lost * d
    before, after = count_macs(tiny)["macs_image"], count_macs(pruned)["macs_image"]
    assert before - after == attention_macs_lost
    tp_before = count_macs(tiny, counter="torch_pruning")["macs_image"]
    tp_after = count_macs(pruned, counter="torch_pruning")["macs_image"]
    heads_lost = old.num_heads - new.num_heads
    # torch-pruning's formula also drops q scaling, qkv bias and softmax ops of the lost heads
    extra = n * inner_lost + 3 * n * inner_lost + heads_lost * n * n
    assert tp_before - tp_after == attention_macs_lost + extra


def test_macs_of_a_layer_without_heads(tiny: nn.Module) -> None:
    """A layer pruned to 0 heads (automatic inheritance can do that) adds only its output bias: its
    whole attention's MACs are gone, and counting does not trip on the bias it returns."""
    cfg = tiny.clip_cfg["vision_cfg"]
    d, n = cfg["width"], (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    pruned = copy.deepcopy(tiny)
    block = pruned.visual.transformer.resblocks[0]
    old: HeadAttention = block.attn
    block.attn = HeadAttention(d, 0, old.head_dim)
    inner = old.inner_dim
    lost = n * d * 3 * inner + 2 * n * n * inner + n * inner * d
    assert count_macs(tiny)["macs_image"] - count_macs(pruned)["macs_image"] == lost


SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE")


def _sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """``sdpa_kernel(<backend>)``, or skip when this torch / CPU cannot run that backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name, None)
    if backend is None:
        pytest.skip(f"torch {torch.__version__} has no SDPA backend {name}")
    q = torch.randn(1, 2, 5, 8)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(5, 5))
    except RuntimeError as error:
        pytest.skip(f"SDPA backend {name} does not run on this CPU: {str(error)[:80]}")
    return sdpa_kernel(backend)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_macs_vit_b32_equal_hand_count_under_every_sdpa_backend(backend: str) -> None:
    """ViT-B/32 (random weights, unconverted open_clip attention): 4.41 G per image and
    2.98 G per text (TinyCLIP's table), whichever kernel SDPA dispatches to."""
    cfg = open_clip.get_model_config("ViT-B-32")
    model = open_clip.create_model("ViT-B-32").eval()
    with _sdpa_backend(backend):
        macs = count_macs(model)
    assert macs == {"macs_image": _vit_tower_macs(cfg), "macs_text": _text_tower_macs(cfg)}
    assert (round(macs["macs_image"] / 1e9, 2), round(macs["macs_text"] / 1e9, 2)) == (4.41, 2.98)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_macs_converted_tiny_vit_under_every_sdpa_backend(tiny: nn.Module, backend: str) -> None:
    with _sdpa_backend(backend):
        macs = count_macs(tiny)
    assert macs == {"macs_image": _vit_tower_macs(tiny.clip_cfg), "macs_text": _text_tower_macs(tiny.clip_cfg)}


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_macs_resnet_attention_pool_hand_count(backend: str) -> None:
    """ModifiedResNet's attention pool (``F.multi_head_attention_forward``, separate q/k/v
    weights): 3·n·D² projections + 2·n²·D attention + n·D·O output, n = s² + 1 tokens."""
    from open_clip.modified_resnet import AttentionPool2d

    from compress.evaluation.efficiency import _aten_macs

    s, d, heads, out = 3, 32, 4, 16
    pool = AttentionPool2d(s, d, heads, out).eval()
    n = s * s + 1
    with _sdpa_backend(backend):
        got = _aten_macs(pool, torch.zeros(2, d, s, s))
    assert got == 2 * (3 * n * d * d + 2 * n * n * d + n * d * out)  # batch of 2


def test_attention_flops_equal_the_math_backend_bmm_count() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from compress.evaluation.efficiency import attention_flops

    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    with FlopCounterMode(display=False) as counter:  # explicit math: two bmm
        (q @ k.transpose(-2, -1)).softmax(-1) @ v
    assert attention_flops(q, k, v) == counter.get_total_flops() == 2 * 2 * 3 * 5 * 7 * (4 + 6)


class NativeMHA(LinearCLIP):
    """Its image tower runs ``torch._native_multi_head_attention``, a fused kernel without a formula."""

    def encode_image(self, images: Tensor) -> Tensor:
        x = images.flatten(2).transpose(1, 2)  # [1, 4, 3]
        w, b = torch.eye(3).repeat(3, 1), torch.zeros(9)
        return torch._native_multi_head_attention(x, x, x, 3, 1, w, b, torch.eye(3), torch.zeros(3))[0]


def test_macs_refuse_an_attention_kernel_without_formula() -> None:
    with pytest.raises(RuntimeError, match="no FLOP formula for the attention kernel"):
        count_macs(NativeMHA())


# --- throughput and evaluate_model -------------------------------------------------------


def test_throughput_positive_and_harmonic(tiny: nn.Module) -> None:
    got = throughput(tiny, batch_size=4, warmup=1, iters=2)
    assert set(got) == {"images_per_s", "texts_per_s", "pairs_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in got.values())
    assert got["pairs_per_s"] == pytest.approx(1 / (1 / got["images_per_s"] + 1 / got["texts_per_s"]))
    assert got["pairs_per_s"] < min(got["images_per_s"], got["texts_per_s"])


def test_evaluate_model_tiny_teacher(tiny: nn.Module) -> None:
    torch.manual_seed(1)
    tokenizer = _tokenizer()
    classnames = ["red circle", "blue square", "green triangle", "red square", "blue circle", "green circle"]
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10) % 6
    zs = ZeroShotTask(
        "color_shape",
        [(images[:6], labels[:6]), (images[6:], labels[6:])],
        classnames,
        ["a {}.", "a photo of a {}."],
        label_subsets={"heldout": {0, 1}, "seen": {2, 3, 4, 5}},
    )
    tokens = tokenizer([f"a photo of a {c}" for c in classnames[:4]] * 2)
    ret = RetrievalSet("val", [{"images": images[:4], "texts": tokens[:4]}, (images[4:8], tokens[4:])])
    metrics = evaluate_model(
        tiny, tokenizer, zero_shot_tasks=[zs], retrieval_sets=[ret],
        throughput_kwargs={"batch_size": 2, "warmup": 1, "iters": 1},
    )  # fmt: skip
    expected = {
        "zs/color_shape/top1", "zs/color_shape/top5",
        "zs/color_shape/top1_heldout", "zs/color_shape/top5_heldout",
        "zs/color_shape/top1_seen", "zs/color_shape/top5_seen", "zs/color_shape/mean_per_class_recall",
        "params/vision", "params/text", "params/token_embedding", "params/total",
        "macs/image", "macs/text",
        "throughput/images_per_s", "throughput/texts_per_s", "throughput/pairs_per_s",
    } | {f"ret/val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}  # fmt: skip
    assert set(metrics) == expected
    # zero-shot and retrieval numbers recomputed from the model's features directly
    with torch.no_grad():
        image_features = F.normalize(tiny.encode_image(images), dim=-1)
        weights = []
        for name in classnames:
            emb = F.normalize(tiny.encode_text(tokenizer([f"a {name}.", f"a photo of a {name}."])), dim=-1)
            weights.append(F.normalize(emb.mean(dim=0), dim=-1))
        hit = (image_features @ torch.stack(weights, dim=1)).argmax(dim=1) == labels
        text_features = F.normalize(tiny.encode_text(tokens), dim=-1)
    heldout = (labels == 0) | (labels == 1)
    assert metrics["zs/color_shape/top1"] == pytest.approx(100.0 * hit.float().mean().item())
    assert metrics["zs/color_shape/top1_heldout"] == pytest.approx(100.0 * hit[heldout].float().mean().item())
    assert metrics["zs/color_shape/top1_seen"] == pytest.approx(100.0 * hit[~heldout].float().mean().item())
    # the 8 captions are 4 repeated: identical texts count for every image they caption
    direct = recall_at_k(image_features[:8], text_features, list(range(8)), text_ids=text_identities(tokens))
    assert direct != recall_at_k(image_features[:8], text_features, list(range(8)))
    assert {k: metrics[f"ret/val/{k}"] for k in direct} == pytest.approx(direct)
    assert metrics["ret/val/i2t_r10"] == 100.0  # 8 images, 8 texts
    assert metrics["macs/image"] == _vit_tower_macs(tiny.clip_cfg)
    assert metrics["params/total"] == sum(p.numel() for p in tiny.parameters())
    assert not tiny.training


def test_evaluate_model_restores_training_mode_and_needs_tokenizer(tiny: nn.Module) -> None:
    model = copy.deepcopy(tiny).train()
    metrics = evaluate_model(model, measure_throughput=False, measure_macs=False)
    assert set(metrics) == {"params/vision", "params/text", "params/token_embedding", "params/total"}
    assert model.training
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_model(model, zero_shot_tasks=[ZeroShotTask("t", [], ["a"], ["{}"])])


def test_progress_lines_name_the_set(tiny: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    """``[zero-shot color] 1/1``, not ``[zero-shot] 1/1`` for each of several sets (issue 16)."""
    tokenizer = _tokenizer()
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4) % 2
    tasks = [ZeroShotTask(name, [(images, labels)], ["red", "blue"], ["a {}."]) for name in ("color", "shape")]
    tokens = tokenizer(["a red one", "a blue one"] * 2)
    sets = [RetrievalSet("val", [(images, tokens)])]
    evaluate_model(tiny, tokenizer, zero_shot_tasks=tasks, retrieval_sets=sets, measure_macs=False,
                   measure_throughput=False, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == [
        "[zero-shot color", "[zero-shot shape", "[retrieval val"]
