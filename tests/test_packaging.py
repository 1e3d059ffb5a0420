"""Packaging: the tested torch range is declared with both bounds, the installed torch is in it,
and CI logs the versions pip resolved."""

from __future__ import annotations

import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGGED = ("torch", "torchvision", "open_clip_torch", "timm", "torch-pruning")


def _requirements() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        out[name] = dep[len(name) :].strip()
    return out


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_torch_range_has_both_bounds_and_holds_the_installed_version(package: str) -> None:
    specifiers = pytest.importorskip("packaging.specifiers")
    spec = specifiers.SpecifierSet(_requirements()[package])
    assert {s.operator for s in spec} == {">=", "<"}, f"{package}: declare a lower and an upper bound"
    installed = version(package).split("+")[0]
    assert spec.contains(installed), f"{package} {installed} is outside the declared range {spec}"


def test_ci_prints_the_resolved_versions_before_the_tests(tmp_path: Path) -> None:
    """Run the version block of ``.ci/run`` as it stands (the lines before ``ruff``, minus the venv set-up)."""
    script = (ROOT / ".ci" / "run").read_text()
    start, end = script.index("export HF_HUB_OFFLINE"), script.index("ruff check")
    result = subprocess.run(["bash", "-c", script[start:end]], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert "python" in lines
    for name in LOGGED:
        assert lines[name] == version(name)


def test_ci_runs_the_readmes_test_line_and_the_slow_tier() -> None:
    """``.ci/run`` runs the quick start's test command (the everyday suite) and the slow tier the README names."""
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / ".ci" / "run").read_text()
    quick_start = readme[readme.index("## Quick start"):]
    test_line = next(line for line in quick_start.splitlines() if "python -m pytest" in line)
    everyday = test_line.split("HF_HUB_OFFLINE=1 ", 1)[1].split("  #")[0].strip()
    slow = 'python -m pytest -q -m "slow or slurm"'
    assert everyday == 'python -m pytest -q -m "not slow and not slurm"'
    assert f"\n{everyday}\n" in script and f"\n{slow}\n" in script and f"`HF_HUB_OFFLINE=1 {slow}`" in readme
