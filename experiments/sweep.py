"""Sweep files: one YAML that expands into a set of runs (an ablation grid).

```yaml
name: loss-ablation                # the study; every run's `name` (the run id includes it)
base: ../tiny-test.yaml            # the base run config, relative to this file
set: {train.steps: 40}             # fixed overrides (dotted keys), optional
output_dir: runs/loss-ablation     # default runs/<name>; every run's output.dir
axes:                              # dotted key -> list of values; the Cartesian product
  train.lr: [1.0e-4, 3.0e-4]
  losses: [[{name: affinity}], [{name: clip}]]
zip:                               # groups of keys whose values vary together: each group is one axis
  - {student.model: [a.json, b.json], train.lr: [1.0e-3, 5.0e-4]}
seeds: [0, 1, 2]                   # an axis on the top-level `seed`
exclude:                           # drop the runs whose axis values match all the pairs of one entry
  - {train.lr: 3.0e-4, losses: [{name: clip}]}
```

A value replaces the key's value whole (``losses`` above is a list of loss specs). Runs are
ordered as the product of ``axes`` (in file order), then ``zip`` groups, then ``seeds``. Every
run is a validated :class:`~compress.config.RunConfig` whose run id is the hash of what it
computes (the sweep's name is its ``name``), so the same sweep submitted again gives the same
run ids and finished runs are skipped; its directory ``output_dir/<name>-<axis values>-<run id>``
(``output.run_name``, not part of the id) says which cell of the grid it is; a run whose directory
``output_dir/*-<run id>`` exists already (the axes reordered since) keeps that one. Everything is checked
before anything runs, with one-line errors: unknown sweep keys, unequal zipped lists, a key in
two axes, an exclusion that excludes nothing, an empty expansion, two runs with one run id, and
every run's config (the message names the run's axis values).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.config import ConfigError, OverrideError, RunConfig, parse_override
from compress.config.yamlio import read_yaml
from compress.recipe import config_from_dict, run_dir_for, run_id_of
from compress.rundir import find_run_dir, run_dir_name
from experiments.manifest import MANIFEST_FILE, values_text

SWEEP_KEYS = ("name", "base", "set", "output_dir", "axes", "zip", "seeds", "exclude")
#: keys the sweep sets on every run itself
RESERVED_KEYS = {"name": "the sweep's name", "output.dir": "the sweep's output_dir",
                 "output.run_name": "the sweep's run directories"}

class SweepError(ConfigError):
    """A sweep file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Axis:
    """One axis of the grid: the keys that vary together and their values, one tuple per point."""

    keys: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, eq=False)
class SweepRun:
    """One expanded run: its validated config, its axis values (dotted key -> value) and directory
    (hashable by identity)."""

    index: int
    cfg: RunConfig
    values: dict[str, Any]
    run_dir: Path

    @property
    def run_id(self) -> str:
        return run_id_of(self.cfg)


@dataclass
class Sweep:
    name: str
    path: Path
    output_dir: Path
    axes: list[Axis]
    _runs: list[SweepRun] = field(default_factory=list)

    def runs(self) -> list[SweepRun]:
        return list(self._runs)

    @property
    def manifest(self) -> Path:
        return self.output_dir / MANIFEST_FILE


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read, expand and validate a sweep file; ``overrides`` (``key=value``) apply to every run."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        data = read_yaml(path)
    except ConfigError as error:
        raise SweepError(str(error)) from None
    try:
        return _expand(path, data, overrides)
    except OverrideError:  # a --set of the command line: it applies to every run, and names itself
        raise
    except ConfigError as error:
        raise SweepError(f"{path}: {error}") from None


def _expand(path: Path, data: Any, overrides: Sequence[str]) -> Sweep:
    if not isinstance(data, Mapping):
        raise SweepError("a sweep is a mapping at the top level")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"unknown sweep key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError(f"name: a sweep needs a name of letters, digits, '.', '_', '-', got {name!r}")
    if not isinstance(data.get("base"), str):
        raise SweepError("base: the base run config (a path relative to the sweep file) is required")
    base_path = (path.parent / data["base"]).resolve()
    if not base_path.is_file():
        raise SweepError(f"base: config file not found: {base_path}")
    base = read_yaml(base_path) or {}
    fixed = _mapping(data.get("set") or {}, "set")
    cli = {".".join(keys): value for keys, value in (parse_override(text) for text in overrides)}
    axes = _axes(data)
    axis_keys = [key for axis in axes for key in axis.keys]
    _check_keys(axis_keys, fixed, cli)
    output_dir = Path(data.get("output_dir") or Path("runs") / name).expanduser().absolute()
    exclusions = _exclusions(data.get("exclude") or [], axes)
    points = [dict(zip(axis_keys, itertools.chain(*combo), strict=True))
              for combo in itertools.product(*(axis.points for axis in axes))]
    used = [0] * len(exclusions)
    kept = []
    for values in points:
        hits = [i for i, rule in enumerate(exclusions) if all(values[k] == v for k, v in rule.items())]
        for i in hits:
            used[i] += 1
        if not hits:
            kept.append(values)
    for i, count in enumerate(used):
        if count == 0:
            raise SweepError(f"exclude[{i}]: {exclusions[i]} matches no run of the grid (it would exclude nothing)")
    if not kept:
        raise SweepError("the sweep expands to no runs (every combination is excluded, or an axis has no values)")
    sweep = Sweep(name=name, path=path, output_dir=output_dir, axes=axes)
    seen: dict[str, dict[str, Any]] = {}
    for index, values in enumerate(kept):
        items = [*fixed.items(), *values.items(), ("name", name), ("output.dir", str(output_dir))]
        parsed = [(key.split("."), value) for key, value in items]
        try:  # the --set texts as given, so that an error they bring in names them
            cfg = config_from_dict(base, [*parsed[:len(fixed)], *overrides, *parsed[len(fixed):]])
        except OverrideError:
            raise
        except ConfigError as error:
            raise SweepError(f"run {index} ({describe(values)}): {error}") from None
        run_id = run_id_of(cfg)
        if run_id in seen:
            raise SweepError(
                f"runs ({describe(seen[run_id])}) and ({describe(values)}) are the same experiment (run id "
                f"{run_id}): an axis varies only settings that do not change the result, or values repeat"
            )
        seen[run_id] = values
        cfg.output.run_name = existing_run_name(output_dir, run_id) or run_dir_name(
            name, run_id, short_values(values) if values else None)
        sweep._runs.append(SweepRun(index=index, cfg=cfg, values=values, run_dir=run_dir_for(cfg)))
    return sweep


def existing_run_name(output_dir: Path, run_id: str) -> str | None:
    """The name of the one directory ``output_dir/*-<run_id>`` if there is exactly one: a run keeps its
    directory when the sweep file is edited without changing what it computes (axes reordered, an axis
    of the base value added), so it is found (completed, resumed) by its run id."""
    found = find_run_dir(output_dir, run_id)
    return found.name if found is not None else None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: expected a mapping of dotted keys, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _values(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise SweepError(f"{where}: expected a list of values, got {value!r}")
    return value


def _axes(data: Mapping[str, Any]) -> list[Axis]:
    axes = [Axis((key,), tuple((v,) for v in _values(values, f"axes.{key}")))
            for key, values in _mapping(data.get("axes") or {}, "axes").items()]
    groups = data.get("zip") or []
    if not isinstance(groups, list):
        raise SweepError(f"zip: expected a list of groups (mappings of keys to equally long lists), got {groups!r}")
    for i, group in enumerate(groups):
        group = _mapping(group, f"zip[{i}]")
        lists = {key: _values(values, f"zip[{i}].{key}") for key, values in group.items()}
        lengths = {key: len(values) for key, values in lists.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"zip[{i}]: zipped lists must have equal lengths, got {lengths}")
        axes.append(Axis(tuple(lists), tuple(zip(*lists.values(), strict=True))))
    if "seeds" in data:
        seeds = _values(data["seeds"], "seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise SweepError(f"seeds: expected a list of integers, got {seeds!r}")
        axes.append(Axis(("seed",), tuple((s,) for s in seeds)))
    return axes


def _check_keys(axis_keys: list[str], fixed: Mapping[str, Any], cli: Mapping[str, Any]) -> None:
    """A key varies in one axis only, is not also fixed, and does not contain another (``train``
    and ``train.lr``); the keys the sweep sets itself are refused."""
    named = [(key, "axes") for key in axis_keys] + [(key, "set") for key in fixed] + [(key, "--set") for key in cli]
    for key, where in named:
        if key in RESERVED_KEYS:
            raise SweepError(f"{where}: {key!r} is set by the sweep ({RESERVED_KEYS[key]})")
    for (a, where_a), (b, where_b) in itertools.combinations(named, 2):
        if "axes" not in (where_a, where_b):
            continue  # --set overrides the sweep's set
        if a == b:
            other = "in two axes" if where_a == where_b else f"both an axis and in {where_b}"
            raise SweepError(f"{a!r} is {other}")
        if b.startswith(a + ".") or a.startswith(b + "."):
            raise SweepError(f"{where_a} key {a!r} and {where_b} key {b!r} overlap: one would overwrite the other")


def _exclusions(rules: Any, axes: list[Axis]) -> list[dict[str, Any]]:
    """Each rule names axis keys and values that axis has (else it would silently exclude nothing)."""
    if not isinstance(rules, list):
        raise SweepError(f"exclude: expected a list of mappings (axis key: value), got {rules!r}")
    values_of = {key: [point[i] for point in axis.points] for axis in axes for i, key in enumerate(axis.keys)}
    out = []
    for i, rule in enumerate(rules):
        rule = _mapping(rule, f"exclude[{i}]")
        if not rule:
            raise SweepError(f"exclude[{i}]: an empty rule would exclude every run")
        for key, value in rule.items():
            if key not in values_of:
                raise SweepError(f"exclude[{i}]: {key!r} is not an axis of the sweep (axes: {', '.join(values_of)})")
            if value not in values_of[key]:
                raise SweepError(f"exclude[{i}].{key}: {value!r} is not one of the axis's values {values_of[key]}")
        out.append(rule)
    return out


def describe(values: Mapping[str, Any]) -> str:
    """``train.lr=0.0003, seed=1``: a run's axis values in one line."""
    return values_text(values) or "the base config"


def short_values(values: Mapping[str, Any], limit: int = 80) -> str:
    """A run's axis values for its directory name: ``lr=0.0003_losses=clip_seed=1`` (the last part of
    each key; a loss list by its loss names; a file by its stem); cut with a hash past ``limit``."""
    lasts = [key.rsplit(".", 1)[-1] for key in values]
    parts = []
    for key, value in values.items():
        label = key.rsplit(".", 1)[-1] if lasts.count(key.rsplit(".", 1)[-1]) == 1 else key
        parts.append(f"{label}={_short(value)}")
    text = re.sub(r"[^A-Za-z0-9._+=-]", "-", "_".join(parts))
    if len(text) > limit:
        text = text[:limit] + "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return text


def _short(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, str):
        stem = Path(value).name
        return stem.rsplit(".", 1)[0] if re.search(r"\.(json|ya?ml|safetensors|pt|pth|bin)$", stem) else stem
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return str(value["name"])
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and "name" in v for v in value):
        return "+".join(str(v["name"]) for v in value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]


def code_version() -> dict[str, Any]:
    """The git commit of the code's checkout and whether it has uncommitted changes (to tracked
    files); nulls when the code is not a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def manifest_line(run: SweepRun, backend: str, job_id: str, submitted_at: str, code: Mapping[str, Any]) -> str:
    """One manifest line (JSON): run id, name, run dir, backend, job id, submit time, code, values, config."""
    entry = {"run_id": run.run_id, "name": run.cfg.name, "run_dir": str(run.run_dir), "backend": backend,
             "job_id": job_id, "submitted_at": submitted_at, **code, "values": run.values, "config": run.cfg.to_dict()}
    return json.dumps(entry, default=str) + "\n"


def append_manifest(sweep: Sweep, line: str) -> None:
    """Append one line to the sweep's manifest (one ``write`` of the whole line with ``O_APPEND``, so
    concurrent submissions never interleave; the newest line of a run id wins)."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep.manifest, "a") as f:
        f.write(line)


