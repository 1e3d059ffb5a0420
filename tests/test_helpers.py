"""One of each shared helper (issue 7, point 14): evaluation sets, model input sizes, the
precision policy, moving batches to the device, the ClipOutput extras a forward pass fills."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compress.data as data
import compress.evaluation as evaluation
import compress.evaluation.common as common
from compress.models import load_model
from compress.models.forward import EXTRAS, clip_forward, context_length_of, image_size_of
from compress.outputs import ClipOutput
from compress.precision import resolve_precision, to_device


def test_one_zero_shot_task_and_retrieval_set_class() -> None:
    assert evaluation.ZeroShotTask is data.ZeroShotTask and evaluation.RetrievalSet is data.RetrievalSet
    assert getattr(data, "image_size_of", image_size_of) is image_size_of
    for name in ("autocast", "to_device", "image_size_of", "context_length_of", "PRECISIONS"):
        assert not hasattr(common, name), f"compress.evaluation.common still defines {name}"


@pytest.mark.parametrize("precision", ["fp32", "auto", "bf16", "fp16", "fp8"])
def test_one_precision_policy_for_training_and_evaluation(precision: str) -> None:
    """Evaluation on CPU accepts exactly the precisions training accepts there (it used to run
    bf16 / fp16 / unknown names silently in fp32)."""
    model = load_model("cc-test-teacher")
    try:
        resolve_precision(precision, torch.device("cpu"))
    except ValueError as error:
        with pytest.raises(ValueError, match="precision"):
            evaluation.throughput(model, batch_size=1, warmup=0, iters=1, device="cpu", precision=precision)
        assert "precision" in str(error)
    else:
        rates = evaluation.throughput(model, batch_size=1, warmup=0, iters=1, device="cpu", precision=precision)
        assert rates["pairs_per_s"] > 0


def test_to_device_moves_tensors_and_batches() -> None:
    x = torch.ones(2)
    batch = {"images": x, "captions": ["a", "b"], "num_bad": 0}
    moved = to_device(batch, torch.device("meta"))
    assert moved["images"].device.type == "meta" and moved["captions"] == ["a", "b"] and moved["num_bad"] == 0
    assert to_device(x, "meta").device.type == "meta" and to_device("text", "meta") == "text"


def test_model_input_sizes_from_one_place() -> None:
    model = load_model("cc-test-teacher")
    cfg = model.clip_cfg
    assert image_size_of(model) == cfg["vision_cfg"]["image_size"] and image_size_of(model, 48) == 48
    assert context_length_of(model) == cfg["text_cfg"]["context_length"] and context_length_of(model, 5) == 5


def test_clip_output_has_only_extras_a_forward_fills_and_refuses_others() -> None:
    # ``members`` is an ensemble's list of outputs (ClipOutput.of_members), not an extra a forward fills
    extras = {f.name for f in dataclasses.fields(ClipOutput)} - {"image_features", "text_features", "logit_scale",
                                                                  "members"}
    assert extras == set(EXTRAS)
    model = load_model("cc-test-teacher")
    images, texts = torch.zeros(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long)
    out = clip_forward(model, images, texts, needs=["image_embeds"])
    assert out.image_embeds is not None and out.text_embeds is None
    with pytest.raises(ValueError, match="image_tokens"):
        clip_forward(model, images, texts, needs=["image_tokens"])
