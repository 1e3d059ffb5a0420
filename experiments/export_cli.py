"""``clip-compress export MODEL|RUN_DIR``: ONNX files per tower (parity-checked against PyTorch) and/or a
Hub-ready open_clip folder with a model card (:mod:`compress.export`). Every bad combination of options is
refused in one line before a model is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

#: the ONNX options, refused without ``--onnx``
ONNX_OPTIONS = {"batch": "--batch", "dynamic_batch": "--dynamic-batch", "towers": "--towers", "opset": "--opset"}
#: the lowest opset torch's torch.export-based exporter writes
MIN_OPSET = 18
DEFAULT_PARITY_IMAGES = 8


class ExportCliError(Exception):
    """A user error of the command (one line)."""


def _towers(value: str | None) -> tuple[str, ...]:
    from compress.export.towers import TOWERS

    towers = tuple(t.strip() for t in (value or ",".join(TOWERS)).split(",") if t.strip())
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers or len(set(towers)) != len(towers):
        raise ExportCliError(f"--towers {value}: give image, text or image,text")
    return towers


def _check_folder(path: str, option: str, force: bool) -> None:
    from compress.fileio import check_output

    check_output(path, option, folder=True)
    folder = Path(path)
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ExportCliError(f"{option} {path}: the folder is not empty (--force writes into it)")


def check_args(args: argparse.Namespace) -> None:
    """The one-line refusals, all before a model is loaded."""
    if not args.onnx and not args.hub:
        raise ExportCliError("export: nothing to write; give --onnx DIR, --hub DIR or both")
    if not args.onnx:
        given = [flag for key, flag in ONNX_OPTIONS.items() if getattr(args, key) not in (None, False)]
        if given:
            raise ExportCliError(f"{', '.join(given)}: only with --onnx DIR")
    if args.batch is not None and args.batch < 1:
        raise ExportCliError(f"--batch {args.batch}: a fixed batch size must be at least 1")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise ExportCliError(f"--opset {args.opset}: torch's exporter writes opset {MIN_OPSET} or newer")
    if args.parity_images is not None and args.parity_images < 0:
        raise ExportCliError(f"--parity-images {args.parity_images}: give 0 (no check) or more")
    if args.batch is not None and args.parity_images not in (None, 0, args.batch):
        raise ExportCliError(f"--parity-images {args.parity_images} with --batch {args.batch}: a fixed-batch file "
                             f"runs {args.batch} images at a time (leave --parity-images out, or 0)")
    _towers(args.towers)
    if args.onnx and args.hub and Path(args.onnx).resolve() == Path(args.hub).resolve():
        raise ExportCliError("--onnx and --hub name the same folder; give the ONNX files a folder of their own "
                             "(e.g. --onnx HUB/onnx)")
    for path, option in ((args.onnx, "--onnx"), (args.hub, "--hub")):
        if path:
            _check_folder(path, option, args.force)
    if args.onnx:
        from compress.export.onnx_export import OnnxExportError, require_onnx

        try:
            require_onnx()
        except OnnxExportError as e:
            raise ExportCliError(str(e)) from None


def _hub_form(model: object) -> object:
    """The model the Hub folder holds (:func:`compress.export.hub.hub_model`), or a one-line refusal."""
    from compress.export.hub import hub_model
    from compress.models.pad import PaddingError

    try:
        return hub_model(model)[0]
    except PaddingError as e:
        raise ExportCliError(f"--hub: this non-uniform student has no uniform open_clip form ({e}); export it "
                             "with --onnx, or share its compact folder (compress.models.load_model reads it)") from None


def export(args: argparse.Namespace) -> int:
    """The command (see the module docstring); prints one line per file written."""
    check_args(args)
    from compress.export.hub import write_hub_folder
    from compress.export.onnx_export import DEFAULT_OPSET, OnnxExportError, export_onnx
    from compress.export.parity import check_parity, parity_batch
    from compress.export.source import ExportSourceError, resolve_source
    from compress.models import load_model

    try:
        source = resolve_source(args.model)
    except ExportSourceError as e:
        raise ExportCliError(str(e)) from None
    model = load_model(source.model).float().eval()
    stored = _hub_form(model) if args.hub else None  # a student open_clip cannot hold: refused before any export
    checks = args.batch or (DEFAULT_PARITY_IMAGES if args.parity_images is None else args.parity_images)
    files = []
    if args.onnx:
        try:
            files = export_onnx(model, args.onnx, _towers(args.towers), args.batch, args.opset or DEFAULT_OPSET)
            diffs = check_parity(model, files, *parity_batch(model, checks)) if checks else {}
        except OnnxExportError as e:
            raise ExportCliError(str(e)) from None
        for f in files:
            parity = f"max |ONNX - PyTorch| {diffs[f.tower]:.2g} on {checks} images" if checks else "parity not checked"
            batch = "dynamic batch" if f.batch_size is None else f"batch {f.batch_size}"
            print(f"wrote {f.path} ({f.bytes / 1e6:.1f} MB, {batch}, {f.seconds:.1f} s; {parity})")
    if args.hub:
        folder = write_hub_folder(model, args.hub, source, files, stored, check=checks > 0)
        how = "padded to a uniform model, " if folder.padded else ""
        check = f"open_clip loads it, max difference {folder.max_difference:.2g}" if checks else "load not checked"
        print(f"wrote {folder.path} (open_clip layout, {how}{folder.stored_params['total'] / 1e6:.2f}M parameters, "
              f"README.md model card; {check})")
    return 0
