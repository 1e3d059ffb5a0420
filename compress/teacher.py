"""Where the trainer gets the teacher's outputs: one interface, computed online for now.

A teacher-output cache (outputs stored per sample id) can implement the same call."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from compress.models.attention import HeadAttention
from compress.models.forward import clip_forward, model_list, model_tokenizer_identity, tokenizer_for
from compress.outputs import ClipOutput
from compress.precision import Precision

#: modules whose weights autocast hands to a bf16/fp16 GEMM or convolution on every call
MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, HeadAttention)
#: open_clip's projection matrices, used only as ``x @ proj`` (a matmul, cast the same way)
MATMUL_PARAMETERS = ("proj", "text_projection")


class TeacherSource(Protocol):
    def __call__(self, batch: Mapping[str, Any]) -> ClipOutput: ...


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher is never trained and never DDP-wrapped."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def matmul_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter that autocast casts to the compute dtype in each forward: the
    weights and biases of linear, convolution and attention-projection modules, and ``proj`` /
    ``text_projection`` matrices. Norms, embeddings, positional terms and the logit scale are not in it
    (autocast runs them in float32, or they enter float32 sums)."""
    found = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p is not None and (isinstance(module, MATMUL_MODULES) or name in MATMUL_PARAMETERS):
                found.append((module, name))
    return found


def compute_copy(teacher: nn.Module, precision: Precision) -> nn.Module:
    """The frozen teacher as it runs: on the run's device, with the parameters autocast would cast in every
    forward (:func:`matmul_parameters`) stored in the compute dtype (bf16/fp16) once.

    Autocast casts a tensor that is already in its dtype to itself, and a frozen parameter's cast is
    not cached (it does not require grad), so the teacher's outputs are bit for bit those of the float32
    teacher under autocast, without re-casting ~all its weights in every micro-batch forward, and its
    matmul weights take half the memory. ``teacher`` itself is left as it is (it may also be the
    source a student inherits float32 weights from): a copy is made when anything changes; on the CPU
    in float32 nothing does and ``teacher`` is returned."""
    device, dtype = precision.device, precision.dtype
    with precision.autocast():  # cast only what this precision's autocast really casts
        if not torch.is_autocast_enabled(device.type) or torch.get_autocast_dtype(device.type) != dtype:
            dtype = None
    if dtype is None and all(t.device == device for t in [*teacher.parameters(), *teacher.buffers()]):
        return teacher
    cast = {id(getattr(m, n)) for m, n in matmul_parameters(teacher)} if dtype is not None else set()
    memo: dict[int, Any] = {}  # each tensor copied straight to the device (cast first where it is cast)
    for p in teacher.parameters():
        value = p.detach().to(device=device, dtype=dtype if id(p) in cast else p.dtype, copy=True)
        memo[id(p)] = nn.Parameter(value, requires_grad=False)
    for b in teacher.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    model = freeze(copy.deepcopy(teacher, memo))
    _keep_cast_dtype(teacher, model)
    return model


def _keep_cast_dtype(original: nn.Module, model: nn.Module) -> None:
    """open_clip's text tower casts its embeddings to ``transformer.get_cast_dtype()``, the dtype of the first
    MLP weight: in the copy that answer is pinned to the original's (float32), so the residual stream stays
    float32 as it is under autocast with float32 weights."""
    originals = dict(original.named_modules())
    for name, module in model.named_modules():
        get = getattr(type(module), "get_cast_dtype", None)
        if callable(get):
            module.get_cast_dtype = functools.partial(_same, get(originals[name]))


def _same(value: Any) -> Any:
    return value


class OnlineTeacher:
    """Runs the frozen teacher on every batch (under ``torch.inference_mode`` and the run's autocast,
    its GEMM weights stored in the compute dtype: :func:`compute_copy`), on the batch's
    ``teacher_images`` when the data pipeline prepared the teacher its own view (another size or
    normalisation than the student's), else on ``images``. The outputs come back as ordinary float32
    tensors (usable by the losses' autograd; bf16 embeddings would make an MSE run in bf16).

    A teacher ensemble (``teacher`` a sequence of two or more models) runs each member k on its own view
    (``teacher_images/k``, :func:`compress.data.transforms.teacher_view_key`; ``images`` where the pipeline
    prepared none) and its own tokens: ``batch["texts"]`` where its tokenizer is the student's
    (:func:`compress.models.forward.tokenizer_identity`; ``student`` names it, the first teacher's by default),
    else its own tokenizer's ids of the captions (``teacher/texts/k``, made in the loader's workers, or made here from
    ``batch["captions"]``); the output is :meth:`ClipOutput.of_members`."""

    def __init__(self, teacher: nn.Module | Sequence[nn.Module], precision: Precision, needs: Iterable[str] = (),
                 student: nn.Module | None = None) -> None:
        from compress.data.collate import teacher_texts_key
        from compress.data.transforms import teacher_view_key

        models = model_list(teacher)
        self.members = [compute_copy(freeze(m), precision) for m in models]
        self.teacher = self.members[0]
        self.precision = precision
        self.needs = tuple(needs)
        self.views = [teacher_view_key(k) for k in range(len(models))]
        reference = model_tokenizer_identity(student if student is not None else models[0])
        self.tokenizers = [None if model_tokenizer_identity(m) == reference else tokenizer_for(m) for m in models]
        self.token_keys = [teacher_texts_key(k) for k in range(len(models))]

    def _texts(self, k: int, batch: Mapping[str, Any]) -> Tensor:
        """Member k's token ids: the student's, the ones the loader's workers made with its tokenizer
        (``teacher/texts/k``: :func:`compress.data.pipeline.teacher_tokenizers`), else made here from the captions."""
        tokenizer = self.tokenizers[k]
        if tokenizer is None:
            return batch["texts"]
        if self.token_keys[k] in batch:
            return batch[self.token_keys[k]]
        return tokenizer(list(batch["captions"])).to(batch["texts"].device)

    def __call__(self, batch: Mapping[str, Any]) -> ClipOutput:
        outputs = []
        with torch.inference_mode(), self.precision.autocast():
            for k, model in enumerate(self.members):
                images = batch.get(self.views[k], batch["images"])
                outputs.append(clip_forward(model, images, self._texts(k, batch), self.needs))
        return ClipOutput.of_members([_normal_float(out) for out in outputs])


def _normal_float(out: ClipOutput) -> ClipOutput:
    """Inference-mode outputs as ordinary tensors (an inference tensor cannot be saved for a backward),
    half-precision ones in float32."""

    def convert(t: Tensor) -> Tensor:
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()

    return ClipOutput(**{k: None if v is None else convert(v) for k, v in vars(out).items() if k != "members"})


def load_teachers(cfg: Any) -> list[nn.Module]:
    """Every teacher of ``cfg`` (:meth:`~compress.config.RunConfig.teacher_specs`), frozen, on the CPU, in order,
    after ``torch.manual_seed(cfg.seed)``: random teachers (tests) are a function of the seed, the same for the run
    and for the generator of its teacher-output cache."""
    from compress.models import load_model

    torch.manual_seed(cfg.seed)
    return [freeze(load_model(t.model, pretrained=t.pretrained, force_quick_gelu=t.force_quick_gelu))
            for t in cfg.teacher_specs()]
