"""This project's models in LAION's clip_benchmark (1.6.2): a model type ``clip_compress`` and its CLI.

clip_benchmark loads a model through ``clip_benchmark.models.TYPE2FUNC[model_type](model_name,
pretrained, cache_dir, device) -> (model, transform, tokenizer)``; its ``open_clip`` type reads open_clip
names and ``local-dir:`` folders, so it loads a uniform export, but neither a non-uniform one (per-layer
heads and MLP widths) nor this project's shipped model names (``cc-demo-student``, the TinyCLIP configs),
which only this project's process registers. :func:`load_clip_compress` is the loader of the
``clip_compress`` type; it reads whatever ``compress.models.load_model`` reads:

- an exported folder (uniform or not; ``local-dir:`` accepted) or a run directory (its final model), with
  ``pretrained`` empty;
- a model name (open_clip's or this project's) or config JSON with ``pretrained`` a checkpoint file (or an
  open_clip tag); a self-describing checkpoint written by this project with ``pretrained`` empty.

A model name without weights is refused (it would be evaluated at random initialisation).

:func:`main` (console script ``clip-compress-benchmark``) is clip_benchmark's own CLI with the type
registered (:func:`register`): the same arguments, ``--model_type clip_compress`` by default, and an empty
``--pretrained`` where none is given (clip_benchmark's default, ``laion400m_e32``, is an open_clip tag).

NumPy >= 2.4 (upstream LAION-AI/CLIP_benchmark issue #147, open): clip_benchmark 1.6.2's zero-shot top-k
accuracy ends in ``float(t.sum(0, keepdim=True).cpu().numpy())``, a 1-element 1-D array, which NumPy 2.4
no longer converts (``TypeError: only 0-dimensional arrays can be converted to Python scalars``; NumPy
1.25 to 2.3 only warned). :func:`register` replaces that one function, where it fails, by a copy that
takes the array's single element (``...numpy()[0]``): the same float32 count of correct samples, divided
by the same ``n``, so every number is the one clip_benchmark computes on an older NumPy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.models import ModelLoadError, load_model

#: the clip_benchmark model type this module registers
MODEL_TYPE = "clip_compress"
EXTRA_HINT = 'pip install "clip-compress[eval]"'


def _clip_benchmark() -> Any:
    """The ``clip_benchmark`` package, or a one-line error naming the extra."""
    try:
        import clip_benchmark.cli
        import clip_benchmark.metrics.zeroshot_classification
        import clip_benchmark.models
    except ImportError as error:
        raise ImportError(f"clip_benchmark is not installed ({error}); {EXTRA_HINT}") from None
    return clip_benchmark


def _model_path(model_name: str, pretrained: str | None) -> tuple[str, str | None]:
    """What ``load_model`` is given: a run directory becomes its final exported model; a folder or a run
    refuses ``pretrained`` (clip_benchmark's CLI default is an open_clip tag)."""
    from compress.rundir import RunDir, RunModelError, final_model

    path = Path(model_name.removeprefix("local-dir:")).expanduser()
    if path.is_dir() and RunDir(path).config.is_file():
        try:
            model_name = str(final_model(path))
        except RunModelError as error:
            raise ModelLoadError(str(error)) from None
    elif not path.is_dir():
        return model_name, pretrained
    if pretrained:
        raise ModelLoadError(f"{model_name} is an exported model holding its weights; pass --pretrained '' "
                             f"(got {pretrained!r})")
    return model_name, None


def load_clip_compress(
    model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable, Callable]:
    """clip_benchmark's loader signature: ``(model, eval transform, tokenizer)`` of a model this project
    loads (module docstring), in eval mode on ``device``. ``cache_dir`` (``--model_cache_dir``) has no use
    here and is refused."""
    if cache_dir:
        raise ModelLoadError(f"--model_cache_dir {cache_dir}: not used by the {MODEL_TYPE} model type (models load "
                             "from files; open_clip tags from the Hugging Face cache)")
    from compress.data.transforms import eval_transform_for
    from compress.models.factory import has_weights
    from compress.models.forward import tokenizer_for

    model_name, weights = _model_path(model_name, pretrained or None)
    if not has_weights(model_name, weights):
        raise ModelLoadError(f"{model_name}: no weights (random initialisation); pass --pretrained CHECKPOINT "
                             "or an open_clip tag, or an exported folder / run directory as --model")
    model = load_model(model_name, pretrained=weights, device=device).eval()
    return model, eval_transform_for(model), tokenizer_for(model)


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """clip_benchmark 1.6.2's ``zeroshot_classification.accuracy`` with ``[0]`` taking the single element of
    the 1-element array NumPy >= 2.4 refuses to convert (module docstring): the same numbers."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]


def _accuracy_fails(accuracy: Callable[..., list[float]]) -> bool:
    """Whether clip_benchmark's own accuracy raises NumPy 2.4's TypeError (probed on a 2-sample batch)."""
    try:
        accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), topk=(1,))
    except TypeError:
        return True
    return False


def patch_zero_shot_accuracy() -> bool:
    """Replace clip_benchmark's zero-shot accuracy by :func:`_accuracy` where it fails on this NumPy;
    whether it is (now) replaced."""
    module = _clip_benchmark().metrics.zeroshot_classification
    if module.accuracy is _accuracy:
        return True
    if not _accuracy_fails(module.accuracy):
        return False
    module.accuracy = _accuracy
    return True


def register() -> None:
    """Make ``--model_type clip_compress`` known to clip_benchmark (``TYPE2FUNC`` and the ``MODEL_TYPES``
    list its CLI offers as choices) and apply the NumPy 2.4 workaround. Idempotent."""
    models = _clip_benchmark().models
    models.TYPE2FUNC[MODEL_TYPE] = load_clip_compress
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list object clip_benchmark.cli's parser reads
    patch_zero_shot_accuracy()


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``args`` (the last one), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def cli_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` for clip_benchmark's CLI: for ``eval``, ``--model_type clip_compress`` unless a type is given,
    and for that type ``--pretrained ''`` unless ``--pretrained`` or ``--pretrained_model`` is given."""
    args = list(argv)
    if not args or args[0] != "eval":
        return args
    if _option(args, "--model_type") is None:
        args += ["--model_type", MODEL_TYPE]
    given = any(a.split("=")[0] in ("--pretrained", "--pretrained_model") for a in args)
    if _option(args, "--model_type") == MODEL_TYPE and not given:
        args += ["--pretrained", ""]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``clip-compress-benchmark``: clip_benchmark's CLI (``eval`` / ``build``) with the ``clip_compress``
    model type registered; ``argv`` (default ``sys.argv[1:]``) as :func:`cli_arguments` completes it."""
    try:
        register()
    except ImportError as error:
        print(f"clip-compress-benchmark: {error}", file=sys.stderr)
        return 2
    import clip_benchmark.cli

    args = cli_arguments(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["clip_benchmark", *args]  # clip_benchmark's parser reads sys.argv
    try:
        clip_benchmark.cli.main()
    except ModelLoadError as error:
        print(f"clip-compress-benchmark: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
