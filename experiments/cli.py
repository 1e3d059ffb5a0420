"""The ``clip-compress`` command line: run, sweep, status, collect, table, plot, eval, list, demo, cache-teacher,
export."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from compress.recipe import run_id_of
from experiments.backends import get_backend
from experiments.cli_parser import build_parser


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _cmd_list(args: argparse.Namespace) -> int:
    from compress.registry import REGISTRIES

    kind, name = (args.kind, args.name) if args.kind in REGISTRIES or args.kind is None else (None, args.kind)
    if args.name is not None and kind is None:
        raise CliError(f"list: {args.kind!r} is not a kind ({', '.join(REGISTRIES)}); give KIND NAME or NAME")
    if name is not None:
        print(describe_plugin(name, kind))
        return 0
    kinds = [kind] if kind else list(REGISTRIES)
    for kind in kinds:
        entries = REGISTRIES[kind].entries()
        print(f"{kind}:")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}")
        print()
    if not args.kind:
        from compress.models import list_shipped_configs

        print("shipped model configs:")
        for name in list_shipped_configs():
            print(f"  {name}")
    print("`clip-compress list NAME`: a plug-in's parameters, defaults and documentation")
    return 0


def describe_plugin(name: str, kind: str | None = None) -> str:
    """``clip-compress list NAME``: each registered plug-in of that name (of ``kind`` only, if given) with
    its config keys (the constructor's parameters: type, default, or the engine's value) and its docstring."""
    import inspect
    import json

    from compress.recipe.context import ENGINE_CONTEXT
    from compress.registry import REGISTRIES, suggest

    kinds = [kind] if kind else list(REGISTRIES)
    found = [k for k in kinds if name in REGISTRIES[k]]
    if not found:
        known = sorted({n for k in kinds for n in REGISTRIES[k].names()})
        raise CliError(f"list: no plug-in {name!r}{' in ' + kind if kind else ''}.{suggest(name, known)} "
                       f"Known: {', '.join(known)}")
    blocks = []
    for k in found:
        registry = REGISTRIES[k]
        factory = registry.get(name)
        lines = [f"{k} {name!r} ({factory.__module__}.{getattr(factory, '__qualname__', factory)})", "parameters:"]
        params = [p for p in registry.signature(name).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        if k == "losses":  # the engine's, on every loss term
            lines.append("  weight: float = 1.0  (every loss: its terms' factor in the summed loss)")
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                lines.append(f"  **{p.name}: any further keys")
                continue
            annotation = "" if p.annotation is p.empty else f": {getattr(p.annotation, '__name__', p.annotation)}"
            if p.name in ENGINE_CONTEXT.get(k, {}):
                default = f"  (set by the engine: {ENGINE_CONTEXT[k][p.name]})"
            elif p.default is p.empty:
                default = "  (required)"
            else:
                try:
                    default = f" = {json.dumps(p.default)}"
                except (TypeError, ValueError):
                    default = f" = {p.default!r}"
            lines.append(f"  {p.name}{annotation}{default}")
        if not params and k != "losses":
            lines.append("  (none)")
        doc = inspect.getdoc(factory) or "(no docstring)"
        lines += ["", *(f"  {line}" if line else "" for line in doc.splitlines())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


#: why a sweep, or a run handed to a backend, is refused under torchrun (every rank would submit it)
UNDER_TORCHRUN = ("torchrun starts the processes of ONE run: use `clip-compress run CONFIG --backend inline` under "
                  "torchrun; sweeps submit their own multi-task jobs (dispatch.gpus_per_node)")


def _refuse_under_torchrun() -> None:
    """Refuse in a process of several (torchrun): each rank would submit the jobs and write the manifest."""
    from compress.distributed import environment

    if environment().world_size > 1:
        raise CliError(UNDER_TORCHRUN)


def _cmd_run(args: argparse.Namespace) -> int:
    from compress.recipe import load_config

    cfg = load_config(args.config, args.set or [])  # before anything imports torch: a YAML mistake fails at once
    from compress.distributed import environment
    from compress.recipe import run_dir_for, run_dir_of
    from compress.run import failed_line
    from experiments.dispatch import STATUS_SUBMITTED, dispatch

    backend = get_backend(args.backend or cfg.dispatch.backend)
    if args.dry_run:
        from compress.plan import build_plan, format_plan

        # the device is checked where the run will run: here, or (slurm) on a node the plan cannot see (runs_here)
        print(format_plan(build_plan(cfg, force=args.force, here=backend.runs_here)))
        return 0
    if not backend.under_torchrun:
        _refuse_under_torchrun()
    rows = dispatch([cfg], backend=args.backend, force=args.force)
    if environment().rank != 0:  # one of several processes (torchrun): rank 0 reports
        return 0 if all(r.get("status") in ("completed", "skipped") for r in rows) else 1
    for row in rows:
        if row.get("status") == "skipped":  # dispatch said "[skip] ... completed result in ..."
            print(f"  {headline_numbers(row)}")
        elif row.get("status") == "completed":
            print(headline(row, run_dir_for(cfg)))
        elif row.get("status") == STATUS_SUBMITTED:
            print(f"[submitted] {cfg.name} ({run_id_of(cfg)}) as job {row['job_id']}: the result lands in "
                  f"{run_dir_of(cfg).result}")
        elif row.get("status") == "failed" and not backend.waits:  # a backend that waits: the run said it here
            print(failed_line(cfg.name, row.get("error"), f"see {run_dir_of(cfg).result}"), file=sys.stderr)
    return 0 if all(r.get("status") in ("completed", "skipped", STATUS_SUBMITTED) for r in rows) else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.set or [])  # before anything imports torch: a YAML mistake fails at once
    _refuse_under_torchrun()
    from experiments.sweep_cli import run_sweep

    return run_sweep(sweep, backend=args.backend, dry_run=args.dry_run, only_failed=args.only_failed,
                     force=args.force)


#: metric keys (by prefix and suffix) a finished run prints, in this order
HEADLINE_KEYS = ("zs/*/top1", "ret/*/i2t_r1", "ret/*/t2i_r1", "sparsity/achieved", "sparsity/target")


def headline(row: dict, run_dir: object) -> str:
    """Two lines for a finished run: where it is, and its main numbers."""
    return f"[{row.get('status')}] {row.get('name')} ({row.get('run_id')}) in {run_dir}\n  " + headline_numbers(row)


def headline_numbers(row: dict) -> str:
    """A finished run's main numbers in one line (:data:`HEADLINE_KEYS`, then the parameters)."""
    import fnmatch

    metrics = row.get("metrics", {})
    parts = []
    for pattern in HEADLINE_KEYS:
        for key in sorted(k for k in metrics if fnmatch.fnmatch(k, pattern)):
            value = metrics[key]
            parts.append(f"{key} {value:.1%}" if key.startswith("sparsity/") else f"{key} {value:.2f}")
    if "params/vision" in metrics and "params/text" in metrics:
        parts.append(f"params/vision+text {(metrics['params/vision'] + metrics['params/text']) / 1e6:.2f}M")
    return "  ".join(parts)


def _cmd_eval_tasks(args: argparse.Namespace) -> int:
    """``eval --tasks LIST``: a task list's tasks, the field's result files."""
    from compress.evaluation.standalone import EvalError
    from compress.evaluation.task_eval import evaluate_tasks

    given = [opt for opt, value in (("--data", args.data), ("--kind", args.kind), ("--image-key", args.image_key),
                                    ("--caption-key", args.caption_key), ("--separator", args.separator)) if value]
    if given:
        raise CliError(f"{', '.join(given)}: not with --tasks (the task list names each task's data)")
    if args.throughput and args.no_throughput:
        raise CliError("--throughput, --no-throughput: give one")
    try:
        summary = evaluate_tasks(args.model, args.tasks, data_root=args.data_root, output_dir=args.output_dir,
                                 device=args.device, batch_size=args.batch_size, throughput=args.throughput,
                                 output=args.output, num_workers=args.workers)
    except EvalError as error:
        raise CliError(str(error)) from None
    width = max(len(k) for k in [*summary["main_metrics"], *summary["tasks_skipped"], "mean_scored"])
    for key, value in summary["main_metrics"].items():
        print(f"{key:<{width}}  {'-' if value is None else f'{value:.4f}'}")
    for key in summary["tasks_skipped"]:
        print(f"{key:<{width}}  skipped")
    print(f"{'mean_scored':<{width}}  {summary['mean_main_metric_scored']:.4f}  (main metrics, fractions: the mean "
          f"over the {summary['tasks_scored']} tasks scored of the {summary['tasks_in_list']} in the list; result "
          f"files in {summary['output_dir']})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from compress.evaluation.standalone import EvalError, evaluate_only

    if args.tasks:
        return _cmd_eval_tasks(args)
    for opt, value in (("--data-root", args.data_root), ("--output-dir", args.output_dir), ("--workers", args.workers),
                       ("--throughput", args.throughput or None)):
        if value is not None:
            raise CliError(f"{opt}: only with --tasks LIST")
    try:
        metrics = evaluate_only(
            args.model,
            data=args.data,
            kind=args.kind,
            device=args.device,
            batch_size=args.batch_size,
            throughput=not args.no_throughput,
            output=args.output,
            csv={"image_key": args.image_key, "caption_key": args.caption_key, "separator": args.separator},
        )
    except EvalError as error:
        raise CliError(str(error)) from None
    width = max(len(k) for k in metrics) if metrics else 0
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo

    run_demo(quick=args.quick, results_dir=args.results, cache_dir=args.cache_dir, force=args.force)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.results import STATUS_FAILED
    from experiments.status import StatusError, format_status, status, summary

    try:
        states = status(Path(args.target))
    except StatusError as error:
        raise CliError(str(error)) from None
    if not states:
        print(f"no runs under {args.target}")
        return 0
    shown = [s for s in states if s.state == STATUS_FAILED] if args.failed else states
    print(format_status(shown))
    if args.failed:
        print(f"(--failed: {len(shown)} of {summary(states)})")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.fileio import check_output
    from experiments.collect import collect
    from experiments.status import StatusError

    check_output(args.output, "-o/--output")
    try:
        collect([Path(p) for p in args.paths], Path(args.output))
    except StatusError as error:
        raise CliError(str(error)) from None
    return 0


def _csv_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (options given comma-separated or repeated); a comma
    inside parentheses stays (``loss=affinity(i2t=1, t2i=0)``)."""
    out: list[str] = []
    for value in values or []:
        depth, start = 0, 0
        for i, ch in enumerate(value + ","):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth <= 0:
                out.append(value[start:i].strip())
                start = i + 1
    return [v for v in out if v]


def _cmd_table(args: argparse.Namespace) -> int:
    from analysis.load import AnalysisError, load_results
    from analysis.select import parse_pairs
    from analysis.tables import ablation_table
    from compress.fileio import atomic_write_text, check_output

    if args.output:
        check_output(args.output, "-o/--output")
    try:
        frame = load_results(args.results)
        table = ablation_table(
            frame, rows=_csv_list(args.rows), cols=_csv_list(args.cols), values=_csv_list(args.value),
            baseline=parse_pairs(_csv_list(args.baseline), "--baseline") or None,
            where=parse_pairs(args.filter or [], "--filter"),
        )
        text = table.render(args.format)
    except AnalysisError as error:
        raise CliError(str(error)) from None
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from analysis import plots
    from analysis.load import AnalysisError, load_curves, load_results
    from analysis.select import filter_rows, parse_pairs
    from compress.fileio import check_output

    group = _csv_list(args.group)
    unused = {"--stages": args.stages and args.kind != "curves", "--x": args.x and args.kind in ("curves", "structure"),
              "--y": args.y and args.kind == "structure", "--group": group and args.kind == "structure",
              "--filter": args.filter and args.kind == "structure"}
    refused = [option for option, given in unused.items() if given]
    if refused:
        raise CliError(f"--kind {args.kind} does not use {', '.join(refused)}")
    check_output(args.output, "-o/--output")
    try:
        where = parse_pairs(args.filter or [], "--filter")
        if args.kind == "structure":
            if len(args.results) != 1:
                raise CliError("--kind structure: give one run directory (or its structure.json)")
            path = plots.plot_structure(args.results[0], args.output)
        elif args.kind == "curves":
            curves = filter_rows(load_curves(args.results, stages=args.stages, keys=[*where, *group]), where)
            path = plots.plot_curves(curves, args.output, term=args.y or "loss", group=group)
        else:
            frame = filter_rows(load_results(args.results), where)
            if args.kind == "pareto":
                path = plots.plot_pareto(frame, args.output, x=args.x or "params", y=args.y,
                                         label=group or ["name"])
            else:
                path = plots.plot_steps(frame, args.output, y=args.y, x=args.x or "steps",
                                        group=group or ["inheritance"])
    except AnalysisError as error:
        raise CliError(str(error)) from None
    print(f"wrote {path}")
    return 0


def _loaded(*names: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``module:Class`` of the modules a command imported: a command that did
    not import a module cannot have raised its error, and ``table``/``plot`` must not import torch."""
    found = []
    for name in names:
        module, _, cls = name.partition(":")
        if module in sys.modules:
            found.append(getattr(sys.modules[module], cls))
    return tuple(found)


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from experiments.cache_cli import CacheCliError, cache_teacher

    try:
        return cache_teacher(args)
    except CacheCliError as error:
        raise CliError(str(error)) from None


def _cmd_export(args: argparse.Namespace) -> int:
    from experiments.export_cli import ExportCliError, export

    try:
        return export(args)
    except ExportCliError as error:
        raise CliError(str(error)) from None


#: the function of each command of :func:`experiments.cli_parser.build_parser`
COMMANDS = {"run": _cmd_run, "sweep": _cmd_sweep, "eval": _cmd_eval, "list": _cmd_list, "demo": _cmd_demo,
            "status": _cmd_status, "collect": _cmd_collect, "table": _cmd_table, "plot": _cmd_plot,
            "cache-teacher": _cmd_cache_teacher, "export": _cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except _loaded("compress.config:ConfigError", "compress.registry:RegistryError", "compress.models:ModelLoadError",
                   "experiments.backends.base:DispatchError", "compress.rundir:RunDirError",
                   "compress.checkpoint:CheckpointError", "compress.distributed:DistributedError",
                   "compress.fileio:OutputPathError", "compress.teacher_cache.identity:CacheConfigError",
                   "compress.teacher_cache.store:CacheStoreError") + (CliError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"clip-compress: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks before the compute could not foresee: a full disk, a race
        if args.verbose:
            raise
        from compress.fileio import write_failure

        where = f"{e.filename}: " if e.filename else ""
        print(f"clip-compress: error: {where}{write_failure(e) or e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clip-compress: interrupted", file=sys.stderr)
        return 130
    except _loaded("compress.run:RunInterrupted") as e:  # 128 + the signal: 143 for SIGTERM, 140 for SIGUSR2
        print(f"clip-compress: interrupted ({e})", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
