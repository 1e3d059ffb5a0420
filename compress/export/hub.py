"""A Hub-ready folder in open_clip's layout: ``open_clip_config.json`` (``model_cfg`` with the text tower's
tokenizer settings, ``preprocess_cfg``), ``open_clip_model.safetensors``, the tokenizer's files when the
model uses a Hugging Face tokenizer, and ``README.md`` (:mod:`compress.export.model_card`). ``open_clip.
create_model_and_transforms('local-dir:FOLDER')`` and ``open_clip.get_tokenizer('local-dir:FOLDER')`` load it
without this project (``hf-hub:ORG/REPO`` once uploaded as is).

A non-uniform student (per-layer heads and MLP widths) is padded first with zero heads and zero MLP neurons
to the uniform model computing the same function (:func:`compress.models.pad.pad_to_uniform`); one that has no
such form (a layer keeping more heads than the pruned residual width holds) is refused in one line.
:func:`write_hub_folder` loads the folder back with open_clip and checks its preprocessing, token ids and
embeddings against the student's on rendered images."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.export.model_card import CardFacts, render_card
from compress.export.onnx_export import OnnxFile
from compress.export.parity import PARITY_ATOL, ParityError, rendered_samples
from compress.export.run_facts import stage_rows, task_list_evals
from compress.export.source import ExportSource
from compress.export.towers import inference_form
from compress.fileio import atomic_write_text
from compress.models.build import ModelLoadError, preprocess_config
from compress.models.export import check_uniform, save_open_clip
from compress.models.forward import describe_tokenizer, model_tokenizer_identity, tokenizer_for
from compress.models.params import parameter_report

README_FILE = "README.md"


@dataclass(frozen=True)
class HubFolder:
    """A written folder: whether its weights were padded, their parameter counts, and the largest difference
    between the embeddings of open_clip's load of the folder and the student's (images and texts)."""

    path: Path
    padded: bool
    stored_params: dict[str, int]
    max_difference: float


def hub_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(the model open_clip will build, padded?)``: the student itself when uniform, else its padded form
    (:class:`compress.models.pad.PaddingError`, a :class:`ModelLoadError`, where there is none)."""
    try:
        check_uniform(model, model.clip_cfg)
        return model, False
    except ModelLoadError:
        from compress.models.pad import pad_to_uniform

        return pad_to_uniform(model), True


def card_facts(model: nn.Module, source: ExportSource, stored: nn.Module | None = None,
               onnx: Sequence[OnnxFile] = ()) -> CardFacts:
    """The facts of :func:`render_card`: the MACs of the run's ``result.json`` (else counted now), the padded
    weights' parameter counts and the per-layer structure when ``stored`` is a padded form of ``model``, the
    stages' rows and the task-list evaluations of the run directory (:mod:`compress.export.run_facts`)."""
    metrics = (source.row or {}).get("metrics") or {}
    if "macs/image" in metrics and "macs/text" in metrics:
        macs = {"image": int(metrics["macs/image"]), "text": int(metrics["macs/text"])}
    else:
        from compress.evaluation.efficiency import count_macs

        counted = count_macs(model)
        macs = {"image": counted["macs_image"], "text": counted["macs_text"]}
    padded = stored is not None and stored is not model
    structure = None
    if padded:
        from compress.models.pad import model_structure

        structure = model_structure(model)
    return CardFacts(
        title=source.name, source=source, params=parameter_report(model), macs=macs,
        preprocess=preprocess_config(model), tokenizer=describe_tokenizer(model_tokenizer_identity(model)),
        stored_params=parameter_report(stored) if padded else None, structure=structure, onnx=list(onnx),
        stages=stage_rows(source.run_dir), task_evals=task_list_evals(source.run_dir),
    )


def _save_tokenizer(model: nn.Module, folder: Path) -> None:
    """The Hugging Face tokenizer's files (open_clip reads them from a ``local-dir:`` folder); CLIP's BPE
    tokenizer ships with open_clip and needs none (its context length is in the config)."""
    name = model.clip_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if not name:
        return
    try:
        tokenizer_for(model).tokenizer.save_pretrained(str(folder))
    except Exception as e:  # transformers / hub errors of many types
        raise ModelLoadError(f"the text tower uses the Hugging Face tokenizer {name!r}, which could not be "
                             f"saved into the folder: {type(e).__name__}: {e}") from e


def check_loads_in_open_clip(model: nn.Module, folder: Path, n: int = 4, atol: float = PARITY_ATOL) -> float:
    """Load ``folder`` with open_clip (model, eval transform, tokenizer) and compare with ``model`` on ``n``
    rendered images and captions: the same pixels, the same token ids, embeddings within ``atol``; returns
    the largest embedding difference. Raises :class:`ParityError` otherwise."""
    import open_clip

    from compress.data.transforms import eval_transform_for

    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images, captions = rendered_samples(n)
    pixels = torch.stack([preprocess(i) for i in images])
    ours = torch.stack([eval_transform_for(model)(i) for i in images])
    if pixels.shape != ours.shape or not torch.allclose(pixels, ours, atol=1e-6):
        raise ParityError(f"{folder}: open_clip's preprocessing differs from the student's")
    tokens = tokenizer(captions)
    if not torch.equal(tokens, tokenizer_for(model)(captions)):
        raise ParityError(f"{folder}: open_clip's tokenizer gives other token ids than the student's")
    with torch.no_grad():
        diffs = [(loaded.eval().encode_image(pixels, normalize=True) - model.encode_image(pixels, normalize=True)),
                 (loaded.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True))]
    found = max(float(d.abs().max()) for d in diffs)
    if not found <= atol:
        raise ParityError(f"{folder}: open_clip's load differs from the student by {found:.3g} (tolerance {atol:g})")
    return found


def write_hub_folder(model: nn.Module, folder: str | Path, source: ExportSource, onnx: Sequence[OnnxFile] = (),
                     stored: nn.Module | None = None, check: bool = True) -> HubFolder:
    """Write ``model`` (``stored``: its :func:`hub_model` form, if already made) as a Hub-ready folder with
    its model card, then (``check``) load it back with open_clip (:func:`check_loads_in_open_clip`). The weights
    are written in float32 from the models in eval mode (:func:`compress.export.towers.inference_form`); ``model``
    and ``stored`` are left as they were."""
    folder = Path(folder)
    if stored is None:
        stored, _ = hub_model(model)
    padded = stored is not model
    with contextlib.ExitStack() as forms:  # float32, eval mode; the caller's models are left as they were
        ready = forms.enter_context(inference_form(model))
        kept = forms.enter_context(inference_form(stored)) if padded else ready
        save_open_clip(kept, folder)
        _save_tokenizer(ready, folder)
        atomic_write_text(folder / README_FILE, render_card(card_facts(ready, source, kept, onnx)))
        difference = check_loads_in_open_clip(ready, folder) if check else float("nan")
    return HubFolder(folder, padded, parameter_report(stored), difference)
