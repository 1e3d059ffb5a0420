"""Ablation tables: golden markdown / LaTeX / CSV from hand-written rows (tests/data/analysis_rows.jsonl).

The fixture: affinity + manual inheritance, seeds 0-2: top-1 80, 82, 84; affinity with the
i2t term only: 70, 71 and a failed seed; affinity + CLIP: one failed seed; affinity without
inheritance: seeds 0, 1: 50, 54. Nothing for the other combinations.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from analysis.load import AnalysisError, load_results
from analysis.tables import Cell, ablation_table, direction

ROWS = Path(__file__).parent / "data" / "analysis_rows.jsonl"

GOLDEN_MD = """\
| loss | manual | Δ manual | none | Δ none |
| --- | ---: | ---: | ---: | ---: |
| affinity | **82.0 ± 2.0** | ref | 52.0 ± 2.8 (n=2) | ref |
| affinity(i2t=1, t2i=0) | 70.5 ± 0.7 (2/3, 1 failed) | -11.5 | — | — |
| affinity+clip | failed | — | — | — |

mean ± sample std (ddof=1) over 3 seeds per cell unless marked (n=...); columns: inheritance; values: zs/t/top1; \
—: no run; failed: no run of the cell completed; Δ: difference of the means to loss=affinity; \
bold: best per column (zs/t/top1 higher is better).
"""

GOLDEN_LATEX = r"""% mean ± sample std (ddof=1) over 3 seeds per cell unless marked (n=...)
% columns: inheritance; values: zs/t/top1
% —: no run; failed: no run of the cell completed
% Δ: difference of the means to loss=affinity
% bold: best per column (zs/t/top1 higher is better)
\begin{tabular}{lrrrr}
\toprule
loss & manual & $\Delta$ manual & none & $\Delta$ none \\
\midrule
affinity & \textbf{82.0 $\pm$ 2.0} & ref & 52.0 $\pm$ 2.8 (n=2) & ref \\
affinity(i2t=1, t2i=0) & 70.5 $\pm$ 0.7 (2/3, 1 failed) & -11.5 & --- & --- \\
affinity+clip & failed & --- & --- & --- \\
\bottomrule
\end{tabular}
"""


@pytest.fixture(scope="module")
def frame():
    return load_results(ROWS)


@pytest.fixture(scope="module")
def table(frame):
    return ablation_table(frame, rows=["loss"], cols=["inheritance"], values=["zs/t/top1"],
                          baseline={"loss": "affinity"})


def test_golden_markdown(table):
    assert table.to_markdown() == GOLDEN_MD


def test_golden_latex_is_booktabs_with_escapes(table):
    assert table.to_latex() == GOLDEN_LATEX


def test_mean_std_and_seed_counts_against_hand_computed_values(table):
    full = table.cells[(("affinity",), 0)]
    assert full.n == 3 and full.mean == 82.0 and full.std == pytest.approx(2.0)  # ((-2)^2 + 0 + 2^2) / (3 - 1) = 4
    partial = table.cells[(("affinity(i2t=1, t2i=0)",), 0)]
    assert (partial.n, partial.total, dict(partial.not_completed)) == (2, 3, {"failed": 1})
    assert partial.mean == 70.5 and partial.std == pytest.approx(math.sqrt(0.5))  # (0.25 + 0.25) / 1
    two = table.cells[(("affinity",), 1)]
    assert two.n == 2 and two.std == pytest.approx(statistics.stdev([50.0, 54.0])) == pytest.approx(math.sqrt(8))
    assert table.common_n() == 3
    assert table.delta(("affinity(i2t=1, t2i=0)",), 0) == pytest.approx(-11.5)


def test_one_run_has_no_std_and_is_not_shown_as_zero():
    cell = Cell(values=[81.0])
    assert cell.std is None and cell.mean == 81.0


def test_missing_and_failed_cells(table):
    assert table.cell_text(("affinity+clip",), 0) == "failed"
    assert table.cell_text(("affinity+clip",), 1) == "—"
    assert table.cell_text(("affinity(i2t=1, t2i=0)",), 1) == "—"


def test_csv_holds_the_numbers_and_the_best_flag(frame):
    csv = ablation_table(frame, rows=["loss", "inheritance"], values=["zs/t/top1"]).to_csv().splitlines()
    assert csv[0] == ("loss,inheritance,zs/t/top1 mean,zs/t/top1 std,zs/t/top1 n,zs/t/top1 not completed,"
                      "zs/t/top1 best")
    assert csv[1] == "affinity,manual,82.0,2.0,3,0,True"
    assert csv[2].startswith("affinity,none,52.0,2.828427") and csv[2].endswith(",2,0,False")
    assert csv[4] == "affinity+clip,manual,,,0,1,False"


def test_several_values_one_column_each_with_units_and_lower_is_better(frame):
    text = ablation_table(frame, rows=["loss", "inheritance"], values=["params", "train_time_s"]).to_markdown()
    lines = text.splitlines()
    assert lines[0] == "| loss | inheritance | params | train_time_s |"
    # parameters are equal everywhere: nothing is best; the lowest training time is bold (two ties)
    assert lines[2] == "| affinity | manual | 1.50M ± 0.00M | 11.0 ± 1.0 |"
    assert lines[3] == "| affinity | none | 1.50M ± 0.00M (n=2) | **10.5 ± 0.7 (n=2)** |"


def test_a_cell_mixing_configs_is_refused_naming_the_key(frame):
    with pytest.raises(AnalysisError, match=r"the runs of loss=affinity differ in inheritance.name"):
        ablation_table(frame, rows=["loss"], values=["zs/t/top1"])


def test_unknown_keys_and_bad_baselines_name_close_matches(frame):
    with pytest.raises(AnalysisError, match="unknown key or metric 'inheritence'; close matches: inheritance"):
        ablation_table(frame, rows=["inheritence"], values=["zs/t/top1"])
    with pytest.raises(AnalysisError, match="close matches: zs/t/top1"):
        ablation_table(frame, rows=["loss", "inheritance"], values=["zs/t/top"])
    with pytest.raises(AnalysisError, match="inheritance is not a number"):
        ablation_table(frame, rows=["loss"], values=["inheritance"], where={"inheritance": "manual"})
    with pytest.raises(AnalysisError, match="baseline .*: no such row"):
        ablation_table(frame, rows=["loss"], cols=["inheritance"], values=["zs/t/top1"], baseline={"loss": "clip"})


def test_filter_keeps_matching_rows_numbers_as_numbers(frame):
    table = ablation_table(frame, rows=["loss"], values=["zs/t/top1"], where={"inheritance": "manual", "lr": "1e-3"})
    assert [r[0] for r in table.index] == ["affinity", "affinity(i2t=1, t2i=0)", "affinity+clip"]


def test_directions():
    assert [direction(m) for m in ("zs/imagenet/top1", "ret/coco/i2t_r1", "throughput/pairs_per_s")] == ["max"] * 3
    assert [direction(m) for m in ("params", "macs/image", "train/affinity", "train_time_s")] == ["min"] * 4
    assert direction("sparsity/achieved") is None


def test_a_value_pattern_gives_one_column_per_matching_metric(frame):
    table = ablation_table(frame, rows=["loss", "inheritance"], values=["params/*", "zs/*/top1"])
    assert [c.metric for c in table.columns] == ["params/text", "params/vision", "zs/t/top1"]
    with pytest.raises(AnalysisError, match="no metric matches 'ret/\\*'"):
        ablation_table(frame, rows=["loss", "inheritance"], values=["ret/*"])
