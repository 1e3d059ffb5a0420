"""ONNX export of each tower (:mod:`compress.export.towers`), with a fixed or a dynamic batch dimension.

The exporter is torch's torch.export-based one (``torch.onnx.export(..., dynamo=True)``, the default since
torch 2.9; the TorchScript exporter is deprecated and warns). It traces the model symbolically, so the
text tower's end-of-text pooling (``argmax`` over the token ids, then a gather per row) becomes ``ArgMax`` +
``GatherND`` on the input and the dynamic batch dimension stays symbolic through the attention reshapes;
:class:`~compress.models.attention.HeadAttention` (per-layer head counts, zero-head layers) exports as plain
``MatMul`` / ``Softmax``. Opset 18 is the exporter's own (torchlib's) opset: no version conversion, and
ONNX Runtime >= 1.14 runs it. Weights go into the ``.onnx`` file itself unless they pass protobuf's 2 GB
limit, then beside it (``NAME.onnx.data``, ONNX external data).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.export.towers import INPUT_NAMES, OUTPUT_NAMES, TOWERS, example_input, inference_form, tower_module
from compress.models.build import preprocess_config
from compress.models.forward import context_length_of, image_size_of, model_tokenizer_identity

#: the opset written by default (torchlib's own, see the module docstring)
DEFAULT_OPSET = 18
#: weights above this many bytes go to an external data file (protobuf refuses messages over 2 GiB)
EXTERNAL_DATA_BYTES = 1_900_000_000
#: the name of the dynamic batch dimension in the ONNX graph
BATCH_DIM = "batch"
ONNX_EXTRA = 'pip install "clip-compress[onnx]"'


class OnnxExportError(RuntimeError):
    """An ONNX export that cannot be made (a missing package, a bad option, a tower that does not trace)."""


@dataclass(frozen=True)
class OnnxFile:
    """One exported tower: its file, its batch size (``None``: dynamic), the seconds the export took and the
    bytes written (the ``.onnx`` file plus its external data, if any)."""

    tower: str
    path: Path
    batch_size: int | None
    seconds: float
    bytes: int
    input_name: str
    output_name: str


def require_onnx(*modules: str) -> None:
    """Refuse in one line, naming the extra, when an optional ONNX package is missing."""
    import importlib.util

    missing = [m for m in modules or ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"ONNX export needs {', '.join(missing)}: {ONNX_EXTRA}")


def onnx_file_name(tower: str) -> str:
    return f"{tower}_encoder.onnx"


def tower_metadata(model: nn.Module, tower: str, batch_size: int | None, normalize: bool) -> dict[str, str]:
    """What a deployment needs beside the graph, as ONNX ``metadata_props`` (strings): the preprocessing of
    images or the tokenizer of texts, the embedding size, whether it is normalised, CLIP's logit scale."""
    logit_scale = getattr(model, "logit_scale", None)
    meta: dict[str, Any] = {
        "clip_compress.tower": tower,
        "clip_compress.batch": "dynamic" if batch_size is None else batch_size,
        "clip_compress.normalized": normalize,
        "clip_compress.model": getattr(model, "clip_name", None) or "",
        "clip_compress.logit_scale": float(logit_scale.detach().exp()) if logit_scale is not None else "",
        "clip_compress.model_cfg": json.dumps(model.clip_cfg),
    }
    if tower == "image":
        meta["clip_compress.image_size"] = image_size_of(model)
        meta["clip_compress.preprocess_cfg"] = json.dumps(preprocess_config(model))
    else:
        meta["clip_compress.context_length"] = context_length_of(model)
        meta["clip_compress.tokenizer"] = json.dumps(model_tokenizer_identity(model))
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _tower_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _export_program(model: nn.Module, tower: str, batch_size: int | None, opset: int,
                    normalize: bool) -> tuple[Any, bool, float]:
    """``(torch.onnx's program of the tower, weights stored as external data?, start time)``; ``model`` in float32
    and eval mode."""
    module = tower_module(model, tower, normalize)
    example = example_input(model, tower, batch_size or 2)
    input_name, output_name = INPUT_NAMES[tower], OUTPUT_NAMES[tower]
    shapes = {input_name: {0: torch.export.Dim(BATCH_DIM, min=1)}} if batch_size is None else None
    external = _tower_bytes(module) > EXTERNAL_DATA_BYTES
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[input_name], output_names=[output_name],
                dynamic_shapes=shapes, opset_version=opset, verbose=False,
            )
        except Exception as e:  # torch.export / torchlib raise many types
            raise OnnxExportError(f"{tower} tower: ONNX export failed: {type(e).__name__}: {e}") from e
    return program, external, start


def export_tower(
    model: nn.Module, tower: str, path: str | Path, batch_size: int | None = None,
    opset: int = DEFAULT_OPSET, normalize: bool = True,
) -> OnnxFile:
    """Write ``model``'s ``tower`` (``image`` or ``text``) to ``path`` as ONNX; ``batch_size=None`` makes the
    batch dimension dynamic (named ``batch``), an int fixes it. What is exported is the model in float32 and eval
    mode (:func:`compress.export.towers.inference_form`); ``model`` itself is left as it was."""
    require_onnx()
    import onnx

    if batch_size is not None and batch_size < 1:
        raise OnnxExportError(f"batch size must be at least 1, got {batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with inference_form(model) as ready:
        program, external, start = _export_program(ready, tower, batch_size, opset, normalize)
    proto = program.model_proto
    for key, value in tower_metadata(model, tower, batch_size, normalize).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    for old in (path, path.with_name(path.name + ".data")):
        old.unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(path))
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())
    return OnnxFile(tower, path, batch_size, seconds, size, INPUT_NAMES[tower], OUTPUT_NAMES[tower])


def export_onnx(
    model: nn.Module, folder: str | Path, towers: tuple[str, ...] = TOWERS, batch_size: int | None = None,
    opset: int = DEFAULT_OPSET, normalize: bool = True,
) -> list[OnnxFile]:
    """Each of ``towers`` as ``folder/<tower>_encoder.onnx`` (:func:`export_tower`)."""
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise OnnxExportError(f"towers: unknown {unknown} (known: {', '.join(TOWERS)})" if unknown
                              else "towers: name at least one (image, text)")
    return [export_tower(model, t, Path(folder) / onnx_file_name(t), batch_size, opset, normalize) for t in towers]
