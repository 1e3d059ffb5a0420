"""The ``clip-compress`` argument parser: one function per command adds its arguments (the commands themselves
are :mod:`experiments.cli`'s)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from experiments.backends import backend_names, names_where


def build_parser() -> argparse.ArgumentParser:
    """The ``clip-compress`` parser: one function per command adds its arguments."""
    parser = argparse.ArgumentParser(
        prog="clip-compress",
        description="Compress CLIP models by distillation and weight inheritance (TinyCLIP and relatives).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and full tracebacks")
    # -v is accepted after the command too (`clip-compress run CONFIG -v`)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log debug messages and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_sweep, _add_eval, _add_list, _add_demo, _add_status, _add_collect,
                _add_results_commands, _add_cache_teacher, _add_export):
        add(sub, verbose)
    return parser


def _and(names: Sequence[str]) -> str:
    """``a, b and c``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else list(names))


def _add_run(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``run`` command's arguments."""
    p = sub.add_parser(
        "run", parents=[verbose], help="run one experiment config", description="Run one experiment config."
    )
    p.add_argument("config", help="YAML experiment config (see experiments/configs/)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.lr=3e-4"
    )
    later = names_where(returns_result=False)
    p.add_argument(
        "--backend", choices=backend_names(), default=None,
        help=f"where to run (default: the config's dispatch.backend); {_and(names_where(returns_result=True))} wait "
        f"for the run, {_and(later)} submit{'s' * (len(later) == 1)} the job and return{'s' * (len(later) == 1)}",
    )
    p.add_argument(
        "--force", action="store_true",
        help="start from step 0: rerun a completed run, and do not resume an unfinished one from its checkpoint",
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="validate the config and print the plan (stages, students, parameters, MACs, steps, losses, "
        "schedules, resume state) without training, downloading or writing anything",
    )


def _add_sweep(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``sweep`` command's arguments."""
    p = sub.add_parser(
        "sweep", parents=[verbose], help="run or submit every run of a sweep file",
        description="Expand a sweep file (a base config and axes) into runs and hand those not completed to a "
        f"backend; {_and(names_where(waits=False))} return at once. Writes OUTPUT_DIR/manifest.jsonl.",
    )
    p.add_argument("sweep", help="YAML sweep file (base config, axes, zip, seeds, exclude)")
    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="where to run (default: each run's dispatch.backend)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of every run")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs, their ids and states and what would be submitted; submit and write nothing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--only-failed", action="store_true",
                      help="submit only the runs whose result.json says failed or interrupted")
    mode.add_argument("--force", action="store_true", help="rerun every run from step 0, completed ones included")


def _add_eval(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``eval`` command's arguments."""
    from compress.config.schema import DatasetConfig

    p = sub.add_parser(
        "eval", parents=[verbose], help="evaluate a model",
        description="Zero-shot, retrieval, params, MACs and throughput of a model.",
    )
    p.add_argument(
        "model",
        help="open_clip name[@tag], checkpoint, config JSON, exported model folder, or a run directory "
        "(its model on its own evaluation config, as in its result.json)",
    )
    p.add_argument(
        "--data", default=None,
        help="'synthetic' (default for a model), an ImageNet-layout folder, or a CSV for retrieval",
    )
    p.add_argument("--kind", choices=["synthetic", "folder", "csv"], default=None, help="data kind (guessed)")
    # the keys of a config's data.val for a CSV (DatasetConfig): the same names, the same defaults
    p.add_argument("--image-key", default=None, metavar="COLUMN",
                   help=f"CSV: the column of image paths (data.*.image_key; default {DatasetConfig.image_key})")
    p.add_argument("--caption-key", default=None, metavar="COLUMN",
                   help=f"CSV: the column of captions (data.*.caption_key; default {DatasetConfig.caption_key})")
    p.add_argument("--separator", default=None, metavar="SEP",
                   help=f"CSV: the column separator (data.*.separator; default {DatasetConfig.separator!r}, a tab "
                   "for .tsv)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's, else 128")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (plain eval)")
    p.add_argument("--throughput", action="store_true",
                   help="with --tasks: also measure throughput (off by default there; plain eval measures it)")
    p.add_argument("--output", default=None, help="write the metrics as JSON to this file")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="a task list (DataComp's tasklist.yml format): evaluate on its tasks and write "
                   "clip_benchmark's per-task JSON, DataComp's eval_results.jsonl and summary.json")
    p.add_argument("--data-root", default=None, metavar="ROOT",
                   help="with --tasks: the folder holding the data sets (clip_benchmark's wds_NAME folders)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="with --tasks: where the result files go (default for a run directory: RUN_DIR/eval/LIST)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --tasks: DataLoader worker processes decoding images (default min(4, CPU count); "
                   "0: the main process)")


def _add_list(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``list`` command's arguments."""
    p = sub.add_parser(
        "list", parents=[verbose], help="list plug-ins and model configs, or one plug-in's parameters",
        description="List registered plug-ins and shipped model configs; `list NAME`: one plug-in's parameters, "
        "defaults and documentation."
    )
    p.add_argument("kind", nargs="?", metavar="KIND|NAME",
                   help="a kind (losses, inheritance, schedules): list only it; a plug-in's name: its parameters "
                   "with their defaults, and its documentation")
    p.add_argument("name", nargs="?", metavar="NAME", help="with a KIND: that kind's plug-in NAME")


def _add_demo(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``demo`` command's arguments."""
    p = sub.add_parser(
        "demo", parents=[verbose], help="compress a CLIP on the embedded data set",
        description="Train a small teacher on the embedded shapes data set, distil students, print a table.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller version of the same pipeline (~2 min)")
    p.add_argument("--results", default="results/demo", help="folder for the result rows")
    p.add_argument("--cache-dir", default=None, help="where the trained teacher is cached")
    p.add_argument("--force", action="store_true", help="retrain the teacher and rerun every student")


def _add_status(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``status`` command's arguments."""
    p = sub.add_parser(
        "status", parents=[verbose], help="the state of every run of a sweep or under a folder",
        description="Each run's state (pending, running, completed, failed, interrupted, stopped), stage, step "
        "reached, job id and error, read from the run directories; running means a live process holds the run.",
    )
    p.add_argument("target", metavar="SWEEP_OR_DIR", help="a sweep file (.yaml), or a folder of run directories")
    p.add_argument("--failed", action="store_true", help="list only the failed runs")


def _add_collect(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``collect`` command's arguments."""
    p = sub.add_parser(
        "collect", parents=[verbose], help="gather every result.json row into one JSON Lines file",
        description="Every run and stage result.json under the folders (failed and interrupted rows included), "
        "each with 'row' (run or stage) and 'path' added, sorted by path, written atomically.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="folders of run directories, or result.json files")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the JSON Lines file to write")


def _add_results_commands(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """``table`` and ``plot``: their inputs are result rows, filtered."""
    # the inputs of table and plot: result rows, filtered
    results = argparse.ArgumentParser(add_help=False)
    results.add_argument("results", nargs="+", metavar="RESULTS",
                         help="run or sweep folders, result.json files, or JSON Lines from `clip-compress collect` "
                         "(plot --kind structure: one run folder)")
    results.add_argument("--filter", action="append", metavar="KEY=VALUE", help="keep only rows with this value")
    _add_table(sub, [verbose, results])
    _add_plot(sub, [verbose, results])


def _add_table(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``table`` command's arguments."""
    p = sub.add_parser(
        "table", parents=parents, help="an ablation table (markdown, LaTeX or CSV) from result rows",
        description="Aggregate result rows over seeds into a table: rows and columns by config keys or aliases "
        "(loss, inheritance, student, teacher, stage, target_sparsity, seed, lr, steps, ...), one column per metric "
        "and column value; mean ± sample std (ddof=1) with the seed count, a Δ column against --baseline, the best "
        "per column in bold, failed runs and missing cells shown. No torch import.",
    )
    p.add_argument("--rows", action="append", required=True, metavar="KEY[,KEY]", help="row keys")
    p.add_argument("--cols", action="append", metavar="KEY[,KEY]", help="column keys (default: none)")
    p.add_argument("--value", action="append", required=True, metavar="METRIC[,METRIC]",
                   help="metrics, one column each (e.g. zs/imagenet/top1,params)")
    p.add_argument("--baseline", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="the row the Δ columns compare against, a value per row key")
    p.add_argument("--format", choices=["md", "latex", "csv"], default="md", help="output format (default md)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: print)")


def _add_plot(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``plot`` command's arguments."""
    p = sub.add_parser(
        "plot", parents=parents, help="a figure (PNG or PDF) from result rows or training curves",
        description="pareto: --y (default: the first zero-shot top-1) against --x (params, macs/image, "
        "throughput/pairs_per_s; default params), points labelled by --group, the Pareto front drawn. curves: the "
        "logged term --y (default loss) against the step, one line per run or per --group with a std band. steps: "
        "--y against --x (default steps) per --group (default inheritance), mean ± std over seeds. structure: kept "
        "heads and MLP widths per layer of one pruned run. No torch import.",
    )
    p.add_argument("--kind", choices=["pareto", "curves", "steps", "structure"], required=True)
    p.add_argument("--x", default=None, metavar="KEY", help="x axis (pareto: default params; steps: steps)")
    p.add_argument("--y", default=None, metavar="METRIC", help="y axis metric (curves: the logged term)")
    p.add_argument("--group", action="append", metavar="KEY[,KEY]",
                   help="pareto: point labels (default name); curves: mean per group (default one line per run); "
                   "steps: one line per group (default inheritance)")
    p.add_argument("--stages", action="store_true", help="curves: the per-stage curves of staged runs")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .png or .pdf file to write")


def _add_cache_teacher(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``cache-teacher`` command's arguments."""
    p = sub.add_parser(
        "cache-teacher", parents=[verbose], help="generate or verify a config's teacher-output cache",
        description="Write the teachers' outputs for teacher_cache.num_augmentations views of every training sample "
        "into teacher_cache.dir/<cache id> (resumable; shards locked, so parallel generators share the work), then "
        "print the cache folder, its size, samples, bad samples and the time. The config needs a teacher_cache "
        "section; training data must be map-style (synthetic, csv, folder).",
    )
    p.add_argument("config", help="YAML experiment config with a teacher_cache section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--part", type=int, default=0, metavar="I", help="generate the shards s with s %% N == I first")
    p.add_argument("--parts", type=int, default=1, metavar="N",
                   help="the number of parts (with --dispatch: the number of jobs)")
    p.add_argument("--no-wait", action="store_true",
                   help="generate only this part's shards that no other process holds, and return")
    p.add_argument("--batch-size", type=int, default=1024, metavar="B",
                   help="images per teacher forward: B // num_augmentations samples of their views (at least 1; "
                   "default 1024); with --verify, (sample, view) pairs per forward")
    p.add_argument("--verify", type=int, default=None, metavar="N",
                   help="recompute N random (sample, view) pairs online and print the largest absolute difference per "
                   "output and teacher; exit 1 past the tolerance of the stored dtype (fp32 1e-5, fp16 2e-3, bf16 "
                   "2e-2) or if a stored crop box differs from a fresh draw")
    p.add_argument("--dispatch", action="store_true",
                   help="submit --parts jobs through the config's dispatch backend (slurm: a job array; local: "
                   "processes; inline: here, one after the other), job I generating part I")


def _add_export(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """The ``export`` command's arguments."""
    p = sub.add_parser(
        "export", parents=[verbose], help="ONNX files per tower and/or a Hub-ready open_clip folder with a model card",
        description="Export a finished run's student (or a model): --onnx DIR writes image_encoder.onnx and "
        "text_encoder.onnx (L2-normalised embeddings; dynamic batch unless --batch N) and checks them against "
        "PyTorch with ONNX Runtime on rendered images (max difference 1e-4); --hub DIR writes open_clip's layout "
        "(open_clip_config.json, open_clip_model.safetensors, README.md model card from the run), a non-uniform "
        "student padded with zero heads and neurons to the uniform model computing the same function, and loads "
        "it back with open_clip.",
    )
    p.add_argument("model", metavar="MODEL|RUN_DIR",
                   help="a run directory (its exported student; the card reads its config and result.json), an "
                   "exported model folder, a checkpoint or name@tag")
    p.add_argument("--onnx", metavar="DIR", default=None, help="write one ONNX file per tower into DIR")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=None, metavar="N", help="ONNX: a fixed batch size N")
    batch.add_argument("--dynamic-batch", action="store_true",
                       help="ONNX: a dynamic batch dimension (the default; exclusive with --batch)")
    p.add_argument("--towers", default=None, metavar="image,text", help="ONNX: the towers to export (default both)")
    p.add_argument("--opset", type=int, default=None, help="ONNX: the opset (default 18, the exporter's own)")
    p.add_argument("--hub", metavar="DIR", default=None, help="write a Hub-ready open_clip folder into DIR")
    p.add_argument("--parity-images", type=int, default=None, metavar="N",
                   help="rendered images (and captions) the ONNX files and the Hub folder are checked on (default "
                   "8; with --batch N, N; 0: no check)")
    p.add_argument("--force", action="store_true", help="write into non-empty output folders")
