"""TinyCLIP's ablations on the two embedded benchmarks (shapes, web-like), each sweep rendered into a page.

Each page is ``<name>.md`` (tables and figures).

    python -m experiments.ablations [NAME ...] [--benchmark shapes|web|both]
        [--backend inline|local] [--scale K] [--docs DIR] [--cache-dir DIR] [--render-only]

``shapes`` (``experiments/configs/ablations/``: loss, inheritance, progressive, speedup, logit_scale): exact
captions, the demo's teacher (``clip-compress demo``) trained on the students' own images. ``web``
(``experiments/configs/ablations/web/``: loss, inheritance, progressive, clipkd): the web teacher
(:data:`experiments.demo.WEB_TEACHER`, its own image set with exact captions and every colour-shape pair),
students on another image set with noisy captions (``caption_noise: web``). ``--benchmark both`` (the
default) runs shapes then web; a NAME runs in the benchmarks that have it. Each teacher is trained once and
cached. ``--scale K`` multiplies the batch and the training data by K for bigger machines (same steps).
Runs land in the sweeps' ``output_dir`` (``runs/ablations``, ``runs/ablations/web``); finished runs are
skipped when the command is repeated. The pages go next to the runs (``<output_dir>/pages``) unless
``--docs DIR`` names another folder (the web pages in ``DIR/web``): ``--docs docs/ablations`` rewrites the
repository's pages, which is never done unasked. ``--render-only`` trains nothing: it renders the runs on
disk (the teachers must be in the cache, since the runs are found by them). Ctrl-C stops with one line; the
same command then resumes (an unfinished run from its last checkpoint).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import ConfigError
from compress.recipe import run_dir_for
from compress.rundir import RunDir
from experiments.backends import get_backend
from experiments.demo import FULL, TABLE_COLUMNS, WEB_TEACHER, DemoPlan

CONFIG_DIR = Path(__file__).parent / "configs" / "ablations"
#: the teacher every shapes sweep distils from: the demo's (trained once, cached and shared with ``clip-compress demo``)
TEACHER_PLAN: DemoPlan = FULL
#: the teacher every web sweep distils from (trained once, cached next to the demo's)
WEB_TEACHER_PLAN: DemoPlan = WEB_TEACHER
#: the folder of the pages under the sweeps' ``output_dir`` when ``--docs`` is not given
PAGES_DIR = "pages"
#: the metrics of every ablation table: zero-shot top-1 (all classes, held-out colour-shape pairs), R@1
METRICS = ["zs/color_shape/top1", "zs/color_shape/top1_heldout", "ret/val/i2t_r1", "ret/val/t2i_r1"]
LABELS = {**TABLE_COLUMNS, "sparsity/achieved": "pruned", "train_time_s": "training s"}


@dataclass(frozen=True)
class Ablation:
    """How one sweep is shown: its title, the config key of the table's rows, extra table values, figures."""

    title: str
    rows: str
    values: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()


ABLATIONS: dict[str, Ablation] = {
    "loss": Ablation("The distillation loss", "loss", ("train_time_s",), ("time",)),
    "inheritance": Ablation("Weight inheritance", "inheritance", ("params",), ("pareto", "curves")),
    "progressive": Ablation("Progressive against one-shot pruning (75%)", "n_stages", ("sparsity/achieved", "params"),
                            ("pareto",)),
    "speedup": Ablation("The training speed-up of inheritance", "inheritance", figures=("steps",)),
    "logit_scale": Ablation("Fixed logit scale 50 against each model's own", "loss", figures=("curves",)),
    "clipkd": Ablation("CLIP-KD's loss table", "loss", ("train_time_s",), ("time",)),
}


@dataclass(frozen=True)
class Benchmark:
    """One embedded benchmark: its sweep files, its ablations, its teacher and where its pages go."""

    name: str
    config_dir: Path
    ablations: tuple[str, ...]
    pages: str  # the sub-folder of --docs its pages go to ("": --docs itself)
    teacher_label: str  # how the errors name its teacher

    def plan(self) -> DemoPlan:
        """Its teacher's plan (read at call time, so a test can swap it)."""
        return TEACHER_PLAN if self.name == "shapes" else WEB_TEACHER_PLAN


BENCHMARKS: dict[str, Benchmark] = {
    "shapes": Benchmark("shapes", CONFIG_DIR, ("loss", "inheritance", "progressive", "speedup", "logit_scale"), "",
                        "demo"),
    "web": Benchmark("web", CONFIG_DIR / "web", ("loss", "inheritance", "progressive", "clipkd"), "web", "web"),
}
BENCHMARK_CHOICES = (*BENCHMARKS, "both")


class AblationsError(Exception):
    """A mistake the command reports in one line (exit code 2)."""


class NoResults(AblationsError, FileNotFoundError):
    """None of an ablation's runs has a result row yet."""


def command(name: str, scale: int = 1, docs: str | None = None, benchmark: str = "shapes") -> str:
    """The command that runs an ablation of ``benchmark`` and writes its page (``docs``: the ``--docs DIR`` it
    was given)."""
    return (f"python -m experiments.ablations {name} --benchmark {benchmark}"
            + (f" --scale {scale}" if scale != 1 else "") + (f" --docs {shlex.quote(str(docs))}" if docs else ""))


def cached_teacher(cache: Path, plan: DemoPlan | None = None) -> str | None:
    """The exported model of the teacher of ``plan`` (default the demo's) in ``cache`` if its row there says
    completed; nothing is trained."""
    from experiments.demo import teacher_config
    from experiments.job import completed_row

    row = completed_row(teacher_config(plan or TEACHER_PLAN, cache))
    return row["metrics"]["export/path"] if row is not None else None


class InlineRuns:
    """The runs this process trains itself, with the row each had before. A Ctrl-C inside one of them
    leaves its ``interrupted`` row, which the same command resumes, and ``compress.run`` says so in a
    line naming that row: then that line is the only one."""

    def __init__(self) -> None:
        self.before: dict[Path, dict[str, Any] | None] = {}

    def add(self, run_dirs: Sequence[Path]) -> None:
        from compress.results import read_result

        for run_dir in run_dirs:
            self.before.setdefault(run_dir, read_result(run_dir))

    def reported(self) -> bool:
        """Whether one of them wrote an ``interrupted`` row in this process (its line is printed)."""
        from compress.results import STATUS_INTERRUPTED, read_result

        for run_dir, before in self.before.items():
            row = read_result(run_dir)
            if row is not None and row != before and row.get("status") == STATUS_INTERRUPTED:
                return True
        return False


def scale_overrides(scale: int, config_dir: Path = CONFIG_DIR) -> list[str]:
    """``--scale K``: K x the base's batch (and K x its training data, so as many epochs), the same steps
    and learning rate (``config_dir``: the benchmark's sweep files)."""
    import yaml

    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    if scale == 1:
        return []
    base = yaml.safe_load((config_dir / "base.yaml").read_text())
    batch, samples = base["train"]["batch_size"], base["data"]["train"]["num_samples"]
    return [f"train.batch_size={batch * scale}", f"data.train.num_samples={samples * scale}"]


def wait_for(run_dirs: Sequence[Path], poll_s: float = 10.0, timeout_s: float = 7 * 24 * 3600) -> None:
    """Until no run is pending, running or stopped (the ``local`` backend does not wait); a job that died
    without a row would keep its run stopped: ``TimeoutError`` after ``timeout_s``, naming the runs."""
    from experiments.status import PENDING, RUNNING, STOPPED, run_state

    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [d for d in run_dirs if run_state(d).state in (PENDING, RUNNING, STOPPED)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} run(s) unfinished after {timeout_s:.0f} s, e.g. {waiting[0]} "
                               "(see clip-compress status)")
        time.sleep(poll_s)


def header_comment(path: Path) -> str:
    """The sweep file's leading comment (what it compares), as text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines).split(" Regenerate:")[0]  # the page states the command itself


def render(name: str, run_dirs: Sequence[Path], docs: Path, scale: int = 1, docs_option: str | None = None,
           benchmark: str = "shapes") -> Path:
    """``docs/<name>.md``: the command (with ``--docs docs_option`` when it was given), what the sweep of
    ``benchmark`` compares, the table (mean ± std over seeds) and figures."""
    from analysis.load import load_curves, load_results
    from analysis.plots import plot_curves, plot_pareto, plot_steps
    from analysis.tables import ablation_table

    spec, bench = ABLATIONS[name], BENCHMARKS[benchmark]
    found = [d for d in run_dirs if RunDir(d).result.is_file()]
    if not found:
        where = sorted({str(d.parent) for d in run_dirs})
        raise NoResults(f"ablation {name} ({benchmark}): none of its {len(run_dirs)} runs has a result in "
                        f"{', '.join(where)} (`{command(name, scale, docs_option, benchmark)}` runs them)")
    docs.mkdir(parents=True, exist_ok=True)
    missing = len(run_dirs) - len(found)
    frame = load_results(found)
    frame = frame[frame["row"] == "run"]
    baseline = {spec.rows: str(frame.loc[frame["path"] == str(found[0]), spec.rows].iloc[0])}
    title = spec.title + (" (web-like benchmark)" if benchmark == "web" else "")
    parts = [f"# {title}", "", f"Regenerate from scratch: `{command(name, scale, docs_option, benchmark)}`", "",
             header_comment(bench.config_dir / f"{name}.yaml"), ""]
    if missing:
        parts += [f"**{missing} of {len(run_dirs)} runs have no result yet**: their cells count fewer seeds.", ""]
    if name == "speedup":
        parts += [ablation_table(frame, rows=[spec.rows], cols=["steps"], values=METRICS[:1], labels=LABELS)
                  .to_markdown(), "", speedup_text(frame), ""]
    else:
        table = ablation_table(frame, rows=[spec.rows], values=[*METRICS, *spec.values], baseline=baseline,
                               labels=LABELS)
        parts += [table.to_markdown(), ""]
    figures: dict[str, Callable[[Path], Any]] = {
        "pareto": lambda p: plot_pareto(frame, p, x="params", label=(spec.rows,)),
        "time": lambda p: plot_pareto(frame, p, x="train_time_s", label=(spec.rows,)),
        "curves": lambda p: plot_curves(load_curves(found), p, term="loss", group=(spec.rows,)),
        "steps": lambda p: plot_steps(frame, p, group=(spec.rows,)),
    }
    for kind in spec.figures:
        path = figures[kind](docs / f"{name}-{kind}.png")
        parts += [f"![{kind}]({path.name})", ""]
    out = docs / f"{name}.md"
    out.write_text("\n".join(parts))
    return out


def speedup_text(frame: Any) -> str:
    """TinyCLIP's speed-up: scratch's mean accuracy at its largest budget, the steps manual inheritance
    needs to reach it (linear between budgets), and their ratio."""
    from analysis.plots import steps_to_reach

    metric = METRICS[0]
    done = frame[frame["status"] == "completed"]
    means = done.groupby(["inheritance", "steps"])[metric].mean()
    if "none" not in means.index.get_level_values(0) or "manual" not in means.index.get_level_values(0):
        return "(the speed-up needs completed runs of both `none` and `manual`)"
    scratch, manual = means["none"], means["manual"]
    budget, target = int(scratch.index.max()), float(scratch[scratch.index.max()])
    reached = steps_to_reach(list(manual.index), list(manual.values), target)
    smallest = int(manual.index.min())
    if reached is not None and float(manual[smallest]) >= target:
        return (f"Scratch reaches {target:.1f} top-1 after {budget} steps; manual inheritance is already at "
                f"{float(manual[smallest]):.1f} with the smallest budget here ({smallest} steps): a speed-up of at "
                f"least **{budget / smallest:.1f}x** (the paper: 1.4-7.8x).")
    if reached is None:
        return (f"Manual inheritance does not reach scratch's {target:.1f} ({budget} steps) within "
                f"{int(manual.index.max())} steps: no speed-up here.")
    return (f"Scratch reaches {target:.1f} top-1 after {budget} steps; manual inheritance reaches it after "
            f"{reached:.0f} steps: a **{budget / reached:.1f}x** speed-up (the paper: 1.4-7.8x).")


def selected(names: Sequence[str], benchmark: str) -> list[tuple[Benchmark, list[str]]]:
    """The benchmarks of ``--benchmark`` (``both``: shapes then web), each with the NAMES it has (all of its
    ablations when none are given); a NAME no selected benchmark has is an :class:`AblationsError`."""
    benches = list(BENCHMARKS.values()) if benchmark == "both" else [BENCHMARKS[benchmark]]
    unknown = [n for n in names if not any(n in b.ablations for b in benches)]
    if unknown:
        known = "; ".join(f"{b.name}: {', '.join(b.ablations)}" for b in benches)
        elsewhere = [f"{n} is a {b.name} ablation (--benchmark {b.name})" for n in unknown
                     for b in BENCHMARKS.values() if n in b.ablations]
        hint = f" ({'; '.join(elsewhere)})" if elsewhere else ""
        raise AblationsError(f"unknown ablation(s) {unknown} for --benchmark {benchmark}; known: {known}{hint}")
    out = [(b, [n for n in b.ablations if not names or n in names]) for b in benches]
    return [(b, todo) for b, todo in out if todo]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablations", description=__doc__.splitlines()[0])
    known = "; ".join(f"{b.name}: {', '.join(b.ablations)}" for b in BENCHMARKS.values())
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"ablations ({known}; default: all)")
    parser.add_argument("--benchmark", choices=BENCHMARK_CHOICES, default="both",
                        help="shapes: exact captions, the demo teacher; web: noisy captions, a teacher trained on "
                        "its own images with every pair; both (default): shapes then web")
    parser.add_argument("--backend", choices=["inline", "local"], default="inline",
                        help="inline: the runs one after the other in this process (default); local: each run in "
                        "a process of its own, all started at once, then waited for")
    parser.add_argument("--scale", type=int, default=1, help="K x the batch and the data (bigger machines)")
    parser.add_argument("--docs", default=None, metavar="DIR",
                        help="where the pages go (default: next to the runs, <output_dir>/pages); the web pages go "
                             "to DIR/web; --docs docs/ablations rewrites the repository's pages")
    parser.add_argument("--cache-dir", default=None, help="where the teachers are cached")
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: render the pages from the runs on disk (needs the cached teachers)")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error(f"--scale must be >= 1, got {args.scale}")
    try:
        plan = selected(args.names, args.benchmark)
    except AblationsError as error:
        parser.error(str(error))
    inline = InlineRuns()
    try:
        return run_ablations(plan, args, inline)
    except (AblationsError, ConfigError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not inline.reported():
            print(f"{parser.prog}: interrupted: the same command resumes (finished runs are kept)", file=sys.stderr)
        return 130


def teacher_model(bench: Benchmark, args: argparse.Namespace, cache: Path, inline: InlineRuns) -> str:
    """The exported model of ``bench``'s teacher: the cached one (``--render-only``: nothing is trained, and a
    missing teacher is an error) or trained now unless cached."""
    from experiments.demo import teacher_config, train_teacher

    plan = bench.plan()
    if args.render_only:
        teacher = cached_teacher(cache, plan)
        if teacher is None:
            raise AblationsError(f"--render-only: no trained {bench.teacher_label} teacher in {cache}, and the "
                                 f"{bench.name} runs are found by it (give the --cache-dir it is in, or run without "
                                 "--render-only)")
        return teacher
    inline.add([run_dir_for(teacher_config(plan, cache))])
    return train_teacher(plan, cache, False, "ablations")["metrics"]["export/path"]


def run_ablations(plan: Sequence[tuple[Benchmark, Sequence[str]]], args: argparse.Namespace,
                  inline: InlineRuns) -> int:
    """For each benchmark: train its teacher (unless cached) and run its sweeps (unless ``--render-only``),
    then render each page; 1 when a run failed. ``inline`` learns the runs trained in this process before
    they start."""
    from experiments.demo import default_cache_dir
    from experiments.sweep import load_sweep
    from experiments.sweep_cli import run_sweep

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    failed = 0
    missing: list[tuple[Benchmark, str, NoResults, Path]] = []
    for bench, names in plan:
        teacher = teacher_model(bench, args, cache, inline)
        overrides = [f"teacher.model={teacher}", *scale_overrides(args.scale, bench.config_dir)]
        for name in names:
            path = bench.config_dir / f"{name}.yaml"
            sweep = load_sweep(path, overrides)
            run_dirs = [run.run_dir for run in sweep.runs()]
            if not args.render_only:
                if get_backend(args.backend).waits:  # trained in this process
                    inline.add(run_dirs)
                failed |= run_sweep(path, backend=args.backend, overrides=overrides)
                wait_for(run_dirs)
            docs = Path(args.docs) / bench.pages if args.docs else sweep.output_dir / PAGES_DIR
            try:
                page = render(name, run_dirs, docs, args.scale, args.docs, bench.name)
                print(f"[ablations] {bench.name} {name}: {page}")
            except NoResults as error:
                missing.append((bench, name, error, sweep.output_dir))
    if len(missing) == 1:
        raise missing[0][2]
    if missing:
        todo = list(dict.fromkeys(name for _, name, _, _ in missing))
        benches = sorted({bench.name for bench, _, _, _ in missing})
        which = benches[0] if len(benches) == 1 else "both"
        folders = ", ".join(sorted({str(folder) for _, _, _, folder in missing}))
        again = " ".join(todo) + f" --benchmark {which}" + (f" --scale {args.scale}" if args.scale != 1 else "")
        raise AblationsError(f"ablations {', '.join(todo)} ({', '.join(benches)}): none of their runs has a result "
                             f"in {folders} (`python -m experiments.ablations {again}` runs them)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
