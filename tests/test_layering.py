"""The import rules of DESIGN.md, checked on the source tree (they held by care alone before):

- ``compress`` (the engine) imports none of ``strategies``, ``experiments``, ``analysis``;
- ``strategies`` (the plug-ins) imports, of this project, only ``compress``;
- only ``experiments`` imports ``submitit``;
- ``analysis`` imports neither ``torch`` nor ``experiments``, not even through what it imports;
- no import circle between modules.

Every import counts, also one inside a function (a lazy import that closes a circle is still a circle).
``from package import submodule`` is an import of the submodule, not of the package's ``__init__``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("compress", "strategies", "experiments", "analysis")
#: top-level package -> the names (of this project's packages and of libraries) it must not import
FORBIDDEN = {
    "compress": {"strategies", "experiments", "analysis", "submitit"},
    "strategies": {"experiments", "analysis", "submitit"},
    "analysis": {"torch", "experiments", "submitit", "strategies"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports, at the top or in a function: ``from a import b`` gives ``a.b`` when
    that is a module of the tree, else ``a``; relative imports resolved."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in MODULES else base)
    return names


def owner(name: str) -> str | None:
    """The module of the tree that ``name`` (a module, or a name inside one) belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


IMPORTS = {module: imported_names(module, path) for module, path in MODULES.items()}


def test_the_tree_is_scanned():
    assert {"compress.train", "strategies.losses.affinity", "experiments.cli", "analysis.tables"} <= set(MODULES)
    assert "compress.outputs" in IMPORTS["compress.train"] or "compress.outputs" in {
        owner(n) for n in IMPORTS["compress.train"]}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_it_may(package):
    broken = sorted(f"{module} imports {name}" for module, names in IMPORTS.items()
                    if module.split(".")[0] == package for name in names
                    if name.split(".")[0] in FORBIDDEN[package])
    assert not broken, "\n".join(broken)


def test_strategies_import_of_this_project_only_compress():
    broken = sorted(f"{module} imports {name}" for module, names in IMPORTS.items()
                    if module.startswith("strategies") for name in names
                    if name.split(".")[0] in PACKAGES and name.split(".")[0] not in ("compress", "strategies"))
    assert not broken, "\n".join(broken)


def import_circles() -> list[list[str]]:
    """The strongly connected components of more than one module in the graph of the tree's imports (Tarjan)."""
    graph = {m: sorted({owner(n) for n in names} - {None, m}) for m, names in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return circles


def test_no_import_circles():
    circles = import_circles()
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_finder_finds_a_circle(monkeypatch):
    """The check above could not pass by finding nothing: a circle put into the graph is found."""
    monkeypatch.setitem(IMPORTS, "compress.outputs", IMPORTS["compress.outputs"] | {"compress.train"})
    assert any({"compress.outputs", "compress.train"} <= set(c) for c in import_circles())


def test_analysis_loads_no_torch_even_through_what_it_imports():
    modules = sorted(m for m in MODULES if m.startswith("analysis"))
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "bad = sorted(m for m in ('torch', 'experiments', 'submitit') if m in sys.modules)\n"
        "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing analysis loads {out.stdout.strip()}"
