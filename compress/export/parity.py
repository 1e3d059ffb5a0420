"""Parity of an ONNX export with the PyTorch model: the same embeddings, within ``atol``, on a batch of real
images (the embedded shapes data set, rendered and preprocessed with the model's own transform) and their
captions (tokenized with the model's own tokenizer), run by ONNX Runtime on the CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from compress.export.onnx_export import OnnxExportError, OnnxFile, require_onnx
from compress.export.towers import inference_form, tower_module

#: the largest absolute difference of an embedding element accepted between ONNX Runtime and PyTorch
PARITY_ATOL = 1e-4


class ParityError(OnnxExportError):
    """An exported tower whose outputs differ from PyTorch's by more than the tolerance."""


def rendered_samples(n: int = 8, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """``n`` rendered validation images of the embedded shapes data set (PIL) and their captions."""
    from compress.data.synthetic import ShapesDataset

    if n < 1:
        raise ValueError(f"a parity batch needs at least one image, got {n}")
    data = ShapesDataset(seed=seed, split="val", num_samples=n)
    images, captions = zip(*(data.pil(i) for i in range(n)), strict=True)
    return list(images), list(captions)


def parity_batch(model: nn.Module, n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(images [n, 3, H, W], token ids [n, L])``: :func:`rendered_samples` through the model's eval transform
    and its tokenizer."""
    from compress.data.transforms import eval_transform_for
    from compress.models.forward import tokenizer_for

    images, captions = rendered_samples(n, seed)
    transform = eval_transform_for(model)
    return torch.stack([transform(image) for image in images]), tokenizer_for(model)(captions)


def run_onnx(path: str, inputs: Tensor) -> np.ndarray:
    """The single output of the ONNX model at ``path`` for ``inputs`` (ONNX Runtime, CPU)."""
    require_onnx("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: inputs.numpy()})[0]


def max_difference(model: nn.Module, file: OnnxFile, inputs: Tensor, normalize: bool = True) -> float:
    """max |ONNX Runtime - PyTorch| over the embeddings of ``inputs`` (whose batch must be the file's, if fixed)."""
    if file.batch_size is not None and inputs.shape[0] != file.batch_size:
        raise OnnxExportError(f"{file.path}: fixed batch {file.batch_size}, given {inputs.shape[0]} inputs")
    with torch.no_grad(), inference_form(model) as ready:  # the caller's model keeps its dtype and mode
        expected = tower_module(ready, file.tower, normalize)(inputs).numpy()
    got = run_onnx(str(file.path), inputs)
    if got.shape != expected.shape:
        raise ParityError(f"{file.path}: output shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def check_parity(
    model: nn.Module, files: Sequence[OnnxFile], images: Tensor, tokens: Tensor,
    atol: float = PARITY_ATOL, normalize: bool = True,
) -> dict[str, float]:
    """``{tower: max |difference|}`` of each file on ``images`` / ``tokens``; a dynamic-batch file also on the
    first row alone (another batch size than traced). Raises :class:`ParityError` above ``atol``."""
    found: dict[str, float] = {}
    for file in files:
        inputs = images if file.tower == "image" else tokens
        diffs = [max_difference(model, file, inputs, normalize)]
        if file.batch_size is None and inputs.shape[0] > 1:
            diffs.append(max_difference(model, file, inputs[:1], normalize))
        found[file.tower] = max(diffs)
        if not found[file.tower] <= atol:
            raise ParityError(f"{file.path}: ONNX Runtime differs from PyTorch by {found[file.tower]:.3g} "
                              f"(tolerance {atol:g})")
    return found
