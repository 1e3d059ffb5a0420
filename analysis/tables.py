"""Ablation tables from the results frame: markdown, LaTeX (booktabs) and CSV (no torch import).

Rows and columns are config keys (or aliases, see ``analysis.load.ALIASES``), the values metrics.
A cell aggregates the runs of its combination over seeds: mean ± sample standard deviation
(ddof=1, ``statistics.stdev``); one run shows its value alone. The seed count is given once in
the note when every cell has it, else per cell as ``(n=2)``. A cell where some runs did not
complete says so, ``87.6 ± 1.2 (2/3, 1 failed)``; where none did, ``failed``; a combination
without runs is ``—``. Runs of one cell must differ only in their seeds (and in settings that do
not change the result): otherwise the table is refused, naming the keys that differ.

Best per column (bold; ``best`` in CSV) by :func:`direction`: higher is better for zero-shot,
retrieval and throughput; lower for parameters, MACs, losses, time and steps; other metrics are
not marked.
"""

from __future__ import annotations

import fnmatch
import io
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.load import AnalysisError, value_text
from analysis.select import check_cells, expand_metrics, filter_rows, resolve_key
from compress.results import STATUS_COMPLETED

#: metric patterns (fnmatch) whose best value is the highest, then those whose best is the lowest
HIGHER_IS_BETTER = ("zs/*", "ret/*", "throughput/*", "train/samples_per_s")
LOWER_IS_BETTER = ("params", "params/*", "macs/*", "loss", "loss/*", "train/*", "*duration_s", "train_time_s",
                   "steps", "samples_seen")
MISSING = "—"


def direction(metric: str) -> str | None:
    """``max``, ``min`` or ``None`` (no best marked) for a metric name."""
    if any(fnmatch.fnmatchcase(metric, p) for p in HIGHER_IS_BETTER):
        return "max"
    if any(fnmatch.fnmatchcase(metric, p) for p in LOWER_IS_BETTER):
        return "min"
    return None


@dataclass
class Cell:
    """The runs of one (row, column): their values and the statuses of those that did not complete."""

    values: list[float] = field(default_factory=list)
    not_completed: Counter[str] = field(default_factory=Counter)
    without_value: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def total(self) -> int:
        return self.n + sum(self.not_completed.values()) + self.without_value

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); ``None`` for fewer than two runs."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def problems(self) -> str:
        parts = [f"{k} {status}" for status, k in sorted(self.not_completed.items())]
        if self.without_value:
            parts.append(f"{self.without_value} without value")
        return ", ".join(parts)


@dataclass
class Column:
    """One value column: the column keys' values (may be empty) and the metric."""

    key: tuple[Any, ...]
    metric: str
    header: str


@dataclass
class AblationTable:
    """An aggregated table; render it with :meth:`to_markdown`, :meth:`to_latex` or :meth:`to_csv`."""

    row_keys: list[str]
    col_keys: list[str]
    index: list[tuple[Any, ...]]
    columns: list[Column]
    cells: dict[tuple[tuple[Any, ...], int], Cell]
    baseline: tuple[Any, ...] | None = None
    baseline_text: str = ""
    digits: int = 1

    # -- numbers -------------------------------------------------------------------------------
    def common_n(self) -> int:
        """The most frequent seed count of the cells where every run has a value (ties: the larger)."""
        counts = Counter(c.n for c in self.cells.values() if c.n and c.n == c.total)
        counts = counts or Counter(c.n for c in self.cells.values() if c.n)
        return max(counts, key=lambda n: (counts[n], n)) if counts else 0

    def marked_n(self, cell: Cell) -> bool:
        """Whether a cell shows its own seed count: all its runs have a value, but not the common count."""
        return bool(cell.n) and cell.n == cell.total and cell.n != self.common_n()

    def best(self, j: int) -> set[tuple[Any, ...]]:
        """The rows holding the best mean of column ``j`` (none when the metric has no direction
        or fewer than two cells have a value)."""
        sense = direction(self.columns[j].metric)
        means = {r: self.cells[(r, j)].mean for r in self.index if self.cells[(r, j)].mean is not None}
        if sense is None or len(set(means.values())) < 2:
            return set()
        target = max(means.values()) if sense == "max" else min(means.values())
        return {r for r, m in means.items() if m == target}

    def delta(self, r: tuple[Any, ...], j: int) -> float | None:
        if self.baseline is None:
            return None
        mean, base = self.cells[(r, j)].mean, self.cells[(self.baseline, j)].mean
        return None if mean is None or base is None else mean - base

    def _formatter(self, j: int) -> tuple[float, str, int]:
        """(scale, suffix, decimals) for column ``j``, from the largest mean or std: integers plain,
        >= 1e4 with K/M/G/T (three significant digits), >= 1000 without decimals, >= 1 with ``digits`` decimals,
        below 1 three significant digits."""
        cells = [self.cells[(r, j)] for r in self.index]
        numbers = [v for c in cells for v in (c.mean, c.std) if v is not None]
        largest = max((abs(v) for v in numbers), default=0.0)
        if numbers and all(float(v).is_integer() for v in numbers) and largest < 1e4:
            return 1.0, "", 0
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if largest >= 10 * scale or (scale > 1e3 and largest >= scale):
                return scale, suffix, max(0, 2 - math.floor(math.log10(largest / scale)))
        if largest >= 1000:
            return 1.0, "", 0
        if largest >= 1 or largest == 0:
            return 1.0, "", self.digits
        return 1.0, "", max(0, 2 - math.floor(math.log10(largest)))

    def _number(self, value: float, j: int, sign: bool = False) -> str:
        scale, suffix, decimals = self._formatter(j)
        return f"{value / scale:{'+' if sign else ''}.{decimals}f}{suffix}"

    def cell_text(self, r: tuple[Any, ...], j: int) -> str:
        cell = self.cells[(r, j)]
        if cell.total == 0:
            return MISSING
        if cell.n == 0:
            return "failed" if set(cell.not_completed) == {"failed"} and not cell.without_value else cell.problems()
        text = self._number(cell.mean, j)  # type: ignore[arg-type]
        if cell.std is not None:
            text += f" ± {self._number(cell.std, j)}"
        if cell.n != cell.total:
            text += f" ({cell.n}/{cell.total}, {cell.problems()})"
        elif self.marked_n(cell):
            text += f" (n={cell.n})"
        return text

    def delta_text(self, r: tuple[Any, ...], j: int) -> str:
        if r == self.baseline:
            return "ref"
        value = self.delta(r, j)
        return MISSING if value is None else self._number(value, j, sign=True)

    # -- layout --------------------------------------------------------------------------------
    def headers(self) -> list[str]:
        out = list(self.row_keys)
        for column in self.columns:
            out.append(column.header)
            if self.baseline is not None:
                out.append(f"Δ {column.header}")
        return out

    def body(self, bold: tuple[str, str]) -> list[list[str]]:
        best = [self.best(j) for j in range(len(self.columns))]
        lines = []
        for r in self.index:
            line = [value_text(v) for v in r]
            for j in range(len(self.columns)):
                text = self.cell_text(r, j)
                line.append(f"{bold[0]}{text}{bold[1]}" if r in best[j] else text)
                if self.baseline is not None:
                    line.append(self.delta_text(r, j))
            lines.append(line)
        return lines

    def notes(self) -> list[str]:
        n = self.common_n()
        if n > 1:
            first = f"mean ± sample std (ddof=1) over {n} seeds"
            first += " per cell unless marked (n=...)" if any(map(self.marked_n, self.cells.values())) else ""
        else:
            first = "one run per cell (no std)"
        out = [first]
        if self.col_keys:
            metrics = list(dict.fromkeys(c.metric for c in self.columns))
            single = f"; values: {metrics[0]}" if len(metrics) == 1 else ""
            out.append(f"columns: {', '.join(self.col_keys)}{single}")
        out.append(f"{MISSING}: no run; failed: no run of the cell completed")
        if self.baseline is not None:
            out.append(f"Δ: difference of the means to {self.baseline_text}")
        senses = {c.metric: direction(c.metric) for c in self.columns if direction(c.metric)}
        if senses:
            out.append("bold: best per column (" + ", ".join(
                f"{m} {'higher' if sense == 'max' else 'lower'} is better" for m, sense in senses.items()) + ")")
        return out

    # -- renderings ----------------------------------------------------------------------------
    def to_markdown(self, notes: bool = True) -> str:
        """A GitHub markdown table (best in bold), then the notes."""
        headers = self.headers()
        align = ["---"] * len(self.row_keys) + ["---:"] * (len(headers) - len(self.row_keys))
        lines = [_md_line(headers), _md_line(align), *(_md_line(line) for line in self.body(("**", "**")))]
        if notes:
            lines += ["", "; ".join(self.notes()) + "."]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """A booktabs ``tabular`` (best in ``\\textbf``), the notes as a comment above it."""
        headers = self.headers()
        spec = "l" * len(self.row_keys) + "r" * (len(headers) - len(self.row_keys))
        lines = [f"% {_latex_comment(note)}" for note in self.notes()]
        lines += [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", _latex_line(headers), "\\midrule"]
        for line in self.body(("\x00", "\x01")):
            lines.append(_latex_line(line))
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    def to_frame(self) -> pd.DataFrame:
        """Numbers for a spreadsheet: per value column its mean, std, n, runs not completed, best and Δ."""
        best = [self.best(j) for j in range(len(self.columns))]
        records = []
        for r in self.index:
            record: dict[str, Any] = dict(zip(self.row_keys, r, strict=True))
            for j, column in enumerate(self.columns):
                cell = self.cells[(r, j)]
                record[f"{column.header} mean"] = cell.mean
                record[f"{column.header} std"] = cell.std
                record[f"{column.header} n"] = cell.n
                record[f"{column.header} not completed"] = cell.total - cell.n
                record[f"{column.header} best"] = r in best[j]
                if self.baseline is not None:
                    record[f"Δ {column.header}"] = self.delta(r, j)
            records.append(record)
        return pd.DataFrame.from_records(records, columns=self._frame_columns())

    def _frame_columns(self) -> list[str]:
        out = list(self.row_keys)
        for column in self.columns:
            out += [f"{column.header} {k}" for k in ("mean", "std", "n", "not completed", "best")]
            if self.baseline is not None:
                out.append(f"Δ {column.header}")
        return out

    def to_csv(self) -> str:
        buffer = io.StringIO()
        self.to_frame().to_csv(buffer, index=False, lineterminator="\n")
        return buffer.getvalue()

    def render(self, fmt: str) -> str:
        """``md``, ``latex`` or ``csv``."""
        renderers = {"md": self.to_markdown, "markdown": self.to_markdown, "latex": self.to_latex, "csv": self.to_csv}
        if fmt not in renderers:
            raise AnalysisError(f"format {fmt!r}: expected md, latex or csv")
        return renderers[fmt]()


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "—": "---", "→": r"$\to$", "\x00": r"\textbf{", "\x01": "}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_comment(text: str) -> str:
    return text.replace("\n", " ")


def _latex_line(cells: Sequence[str]) -> str:
    return " & ".join(latex_escape(c) for c in cells) + r" \\"


def _sort_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0.0, value_text(v))
                 for v in values)


def ablation_table(
    frame: pd.DataFrame,
    rows: Sequence[str],
    cols: Sequence[str] = (),
    values: Sequence[str] = (),
    baseline: Mapping[str, str] | None = None,
    where: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    row_kind: str | None = None,
    sort: bool = True,
    digits: int = 1,
) -> AblationTable:
    """Aggregate ``frame`` (from ``analysis.load``) over seeds into rows x (cols x values).

    ``values``: metrics or patterns (``zs/*/top1``: a column per task). ``baseline``: the row (its
    row-key values) the Δ columns compare against. ``where``: keep only rows with these values.
    ``labels``: headers for metrics. ``row_kind``: ``run`` or ``stage`` rows (default: stage rows
    if ``stage`` is a row or column key, else run rows). ``sort``: rows in value order (the
    baseline first), else in order of appearance. ``digits``: decimals of values in [1, 1000)."""
    if not values:
        raise AnalysisError("give at least one value (a metric)")
    frame = filter_rows(frame, where or {})
    row_keys = [resolve_key(frame, k) for k in rows]
    col_keys = [resolve_key(frame, k) for k in cols]
    metrics = expand_metrics(frame, values)
    for metric in metrics:
        if not pd.api.types.is_numeric_dtype(frame[metric]):
            raise AnalysisError(f"{metric} is not a number (values are numeric metrics); use it as a row or column")
    kind = row_kind or ("stage" if "stage" in row_keys + col_keys else "run")
    frame = frame[frame["row"] == kind]
    if frame.empty:
        raise AnalysisError(f"no {kind} rows left" + (f" after the filter {dict(where)}" if where else ""))
    frame = frame.assign(**{k: frame[k].map(lambda v: v if value_text(v) else "") for k in row_keys + col_keys})
    check_cells(frame, row_keys + col_keys)
    keyed = list(zip(*(frame[k] for k in row_keys), strict=True)) if row_keys else [()] * len(frame)
    col_vals = list(zip(*(frame[k] for k in col_keys), strict=True)) if col_keys else [()] * len(frame)
    index = list(dict.fromkeys(keyed))
    col_index = list(dict.fromkeys(col_vals))
    if sort:
        index.sort(key=_sort_key)
        col_index.sort(key=_sort_key)
    base = None
    base_text = ""
    if baseline:
        wanted = {resolve_key(frame, k): v for k, v in baseline.items()}
        if set(wanted) != set(row_keys):
            raise AnalysisError(f"baseline: give a value for each row key ({', '.join(row_keys)}), got "
                                f"{', '.join(wanted) or 'none'}")
        found = [r for r in index if all(value_text(r[row_keys.index(k)]) == v or _num_eq(r[row_keys.index(k)], v)
                                         for k, v in wanted.items())]
        if not found:
            raise AnalysisError(f"baseline {baseline}: no such row; rows: "
                                + "; ".join(", ".join(map(value_text, r)) for r in index[:10]))
        base = found[0]
        base_text = ", ".join(f"{k}={v}" for k, v in baseline.items())
        index.remove(base)
        index.insert(0, base)
    columns = []
    for ck in col_index:
        for metric in metrics:
            name = (labels or {}).get(metric, metric)
            head = ", ".join(value_text(v) for v in ck)
            header = f"{head} {name}" if head and len(metrics) > 1 else (head or name)
            columns.append(Column(ck, metric, header))
    cells = {(r, j): Cell() for r in index for j in range(len(columns))}
    statuses = frame["status"].tolist()
    for i, (r, ck) in enumerate(zip(keyed, col_vals, strict=True)):
        for j, column in enumerate(columns):
            if column.key != ck:
                continue
            cell = cells[(r, j)]
            value = frame[column.metric].iloc[i]
            if statuses[i] != STATUS_COMPLETED:
                cell.not_completed[str(statuses[i])] += 1
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                cell.without_value += 1
            else:
                cell.values.append(float(value))
    return AblationTable(row_keys, col_keys, index, columns, cells, base, base_text, digits)


def _num_eq(value: Any, text: str) -> bool:
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and float(text) == float(value)
    except ValueError:
        return False
