"""The house's size rule, measured (issue 17): files over 400 lines and functions over 80 lines in the project's
packages (a guide, not a test; the import rules and circles are ``tests/test_layering.py``'s).

    python benchmarks/code_sizes.py                                   # this tree
    mkdir /tmp/old && git archive REV | tar -x -C /tmp/old && python benchmarks/code_sizes.py /tmp/old
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("compress", "strategies", "experiments", "analysis")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def oversized(root: Path) -> list[str]:
    """``FILE path lines`` and ``FUNC path:name lines`` for what is over the limits, in path order."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = path.read_text()
            lines = source.count("\n")
            name = path.relative_to(root)
            if lines > MAX_FILE_LINES:
                out.append(f"FILE {name} {lines}")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        out.append(f"FUNC {name}:{node.name} {length}")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    found = oversized(root)
    print("\n".join(found) or f"no file over {MAX_FILE_LINES} lines, no function over {MAX_FUNCTION_LINES}")
