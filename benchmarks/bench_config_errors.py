"""How long a config mistake takes to report: ``clip-compress run`` on a config with a key written twice, an
unknown key, and an unknown ``--set`` key, each in a fresh interpreter, against the same command in an
interpreter that imports torch first (what the command did before the YAML was checked first, issue 16).

Prints the median wall time of each over ``--rounds`` (interleaved) and the ratio now / torch first.

    python benchmarks/bench_config_errors.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "tiny-test.yaml"


def seconds(argv: list[str], torch_first: bool, cwd: Path) -> float:
    """Wall time of ``main(argv)`` in a fresh interpreter (it must exit 2: a config error)."""
    code = ("import torch\n" if torch_first else "") + (
        f"import sys\nfrom experiments.cli import main\nsys.exit(main({argv!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 2:
        raise SystemExit(f"{argv}: expected a config error (exit 2), got {result.returncode}: {result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "twice.yaml").write_text(CONFIG.read_text() + "name: again\n")
        (folder / "unknown.yaml").write_text(CONFIG.read_text().replace("lr: 1e-3", "lrate: 1e-3"))
        cases = {"key twice": ["run", str(folder / "twice.yaml")],
                 "unknown key": ["run", str(folder / "unknown.yaml")],
                 "unknown --set key": ["run", str(CONFIG), "--set", "train.lrate=1e-3"]}
        print(f"{'mistake':<18} {'now (s)':>8} {'torch first (s)':>16} {'ratio':>6}")
        for name, argv in cases.items():
            now, before = [], []
            for _ in range(args.rounds):
                now.append(seconds(argv, False, folder))
                before.append(seconds(argv, True, folder))
            a, b = statistics.median(now), statistics.median(before)
            print(f"{name:<18} {a:>8.2f} {b:>16.2f} {a / b:>6.3f}")


if __name__ == "__main__":
    main()
