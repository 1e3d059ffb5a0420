"""Choosing rows and keys of the results frame: key names with close matches, filters, and the
check that the runs aggregated together differ only in their seeds (no torch import)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import pandas as pd

from analysis.columns import AnalysisError, config_columns, resolve_key, value_text
from compress.config.identity import NON_IDENTITY_KEYS, NON_IDENTITY_SECTIONS

SEED_KEY = "seed"


def expand_metrics(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Metric names, a pattern with ``*`` standing for every matching column (``zs/*/top1``: one per task)."""
    out: list[str] = []
    for key in keys:
        if "*" not in key:
            out.append(resolve_key(frame, key))
            continue
        found = sorted(str(c) for c in frame.columns if fnmatch.fnmatchcase(str(c), key))
        if not found:
            raise AnalysisError(f"no metric matches {key!r}")
        out += found
    return list(dict.fromkeys(out))


def _matches(column: pd.Series, value: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        try:
            return (column - float(value)).abs() <= 1e-12 * max(abs(float(value)), 1.0)
        except ValueError:
            pass
    return column.map(value_text) == value


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``["loss=affinity", "seed=0"]`` -> a dict; a pair without ``=`` is an error naming ``what``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AnalysisError(f"{what}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def filter_rows(frame: pd.DataFrame, where: Mapping[str, str]) -> pd.DataFrame:
    """The rows whose columns equal the given values (numbers compared as numbers)."""
    for key, value in where.items():
        column = resolve_key(frame, key)
        frame = frame[_matches(frame[column], value)]
    return frame


def _ignored(column: str) -> bool:
    """Config columns that may differ within a cell: seeds, names, and what does not change a result."""
    section, _, rest = column.partition(".")
    return (column.rsplit(".", 1)[-1] == SEED_KEY or column == "name" or section in NON_IDENTITY_SECTIONS
            or rest in NON_IDENTITY_KEYS.get(section, ()))


#: how to fix a refused cell of a table, and of a figure's group
TABLE_FIX = "add them to the rows or columns, or --filter"
GROUP_FIX = "add them to --group, or --filter"


def check_cells(frame: pd.DataFrame, keys: list[str], fix: str = TABLE_FIX) -> None:
    """Refuse a cell (a table cell, a figure's group) that mixes runs differing in more than their seed;
    the one-line error names the keys that differ and ``fix``."""
    config = [c for c in config_columns(frame) if c not in keys and not _ignored(c)]
    if frame.empty or not config:
        return
    groups = frame.groupby(keys, dropna=False, sort=False) if keys else [((), frame)]
    for label, group in groups:
        differ = [c for c in config if group[c].map(value_text).nunique() > 1]
        if differ:
            values = label if isinstance(label, tuple) else (label,)
            where = ", ".join(f"{k}={value_text(v)}" for k, v in zip(keys, values, strict=True)) or "the table"
            raise AnalysisError(f"the runs of {where} differ in {', '.join(differ[:5])}"
                                f"{' ...' if len(differ) > 5 else ''}: {fix}")
