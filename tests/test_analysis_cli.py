"""``clip-compress table`` / ``plot``, and the analysis package without torch in its process."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROWS = Path(__file__).parent / "data" / "analysis_rows.jsonl"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_every_analysis_module_imports_without_torch() -> None:
    modules = sorted(m.name for m in pkgutil.iter_modules(analysis.__path__, "analysis."))
    assert {"analysis.load", "analysis.tables", "analysis.plots", "analysis.structure_report"} <= set(modules)
    for module in modules:
        result = _python(f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)")
        assert result.returncode == 0, (module, result.stderr)


def test_table_and_plot_commands_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from experiments.cli import main\n"
        f"assert main(['table', {str(ROWS)!r}, '--rows', 'loss', '--cols', 'inheritance', '--value', 'zs/t/top1',"
        f" '-o', {str(tmp_path / 't.md')!r}]) == 0\n"
        f"assert main(['plot', {str(ROWS)!r}, '--kind', 'pareto', '--group', 'loss,inheritance',"
        f" '-o', {str(tmp_path / 'p.png')!r}]) == 0\n"
        "assert main(['table', 'missing.jsonl', '--rows', 'loss', '--value', 'x']) == 2\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.md").read_text().startswith("| loss | manual | none |")


def test_table_command_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["table", str(ROWS), "--rows", "loss", "--cols", "inheritance", "--value", "zs/t/top1",
            "--baseline", "loss=affinity"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2] == "| affinity | **82.0 ± 2.0** | ref | 52.0 ± 2.8 (n=2) | ref |"
    assert main([*args, "--format", "latex", "-o", str(tmp_path / "t.tex")]) == 0
    tex = (tmp_path / "t.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{82.0 $\\pm$ 2.0}" in tex
    assert capsys.readouterr().out == f"wrote {tmp_path / 't.tex'}\n"
    assert main([*args, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("affinity,82.0,2.0,3,0,True,0.0,52.0")
    # repeated and comma-separated options, a filter
    assert main(["table", str(ROWS), "--rows", "loss", "--value", "zs/t/top1", "--value", "params",
                 "--filter", "inheritance=manual"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| loss | zs/t/top1 | params |"
    # a label with a comma inside parentheses is one value
    assert main(["table", str(ROWS), "--rows", "loss,inheritance", "--value", "zs/t/top1",
                 "--baseline", "loss=affinity(i2t=1, t2i=0),inheritance=manual"]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line == "| affinity(i2t=1, t2i=0) | manual | 70.5 ± 0.7 (2/3, 1 failed) | ref |"


@pytest.mark.parametrize(("argv", "message"), [
    (["--rows", "los", "--value", "zs/t/top1"], "unknown key or metric 'los'; close matches: loss"),
    (["--rows", "loss", "--cols", "inheritance", "--value", "zs/t/top1", "--baseline", "loss"],
     "--baseline: expected KEY=VALUE, got 'loss'"),
    (["--rows", "loss", "--value", "zs/t/top1"], "the runs of loss=affinity differ in inheritance.name"),
])
def test_table_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table", str(ROWS), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip-compress: error: ") and message in err[0], err


def test_plot_command_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(ROWS), "--kind", "steps", "--x", "train_time_s", "--group", "loss,inheritance",
                 "-o", str(tmp_path / "s.pdf")]) == 0
    assert (tmp_path / "s.pdf").read_bytes()[:4] == b"%PDF"
    assert main(["plot", str(tmp_path), "--kind", "structure", "-o", str(tmp_path / "x.png")]) == 2
    assert "no structure.json" in capsys.readouterr().err
    assert main(["plot", str(ROWS), "--kind", "curves", "-o", str(tmp_path / "c.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_loading_run_folders_does_not_import_torch(tmp_path: Path) -> None:
    """The folder path goes through the run-directory search (experiments.collect/status): torch-free too."""
    import json

    for k, row in enumerate(json.loads(line) for line in ROWS.read_text().splitlines()):
        folder = tmp_path / "runs" / f"run-{k}"
        folder.mkdir(parents=True)
        plain = {key: v for key, v in row.items() if key not in ("row", "path")}
        (folder / "result.json").write_text(json.dumps(plain))
    code = (f"import sys; from analysis.load import load_results\nframe = load_results([{str(tmp_path / 'runs')!r}])\n"
            "assert len(frame) > 3, len(frame)\nsys.exit(3 if 'torch' in sys.modules else 0)")
    result = _python(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("extra", [["--kind", "pareto", "--stages"], ["--kind", "curves", "--x", "params"],
                                   ["--kind", "structure", "--y", "x"]])
def test_plot_options_a_kind_does_not_use_are_refused(extra, capsys, tmp_path):
    assert main(["plot", str(ROWS), *extra, "-o", str(tmp_path / "p.png")]) == 2
    assert "does not use" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_the_readme_table_example_is_the_commands_real_output(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "$ clip-compress table tests/data/analysis_rows.jsonl "
    block = readme.split(command, 1)[1]
    args, shown = block.split("\n", 1)
    shown = shown.split("\n```", 1)[0]
    assert main(["table", str(ROWS), *args.split()]) == 0
    assert capsys.readouterr().out.strip() == shown.strip()
