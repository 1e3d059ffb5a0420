"""benchmarks/gpu_check.sh: parses, goes on past a failing, dying or hanging part and exits 1; its Python
parts run on the CPU (``--cpu-smoke``, tiny models, two processes over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_reports_every_part_and_fails_on_any_failure(tmp_path):
    """A stand-in python: bf16 passes, speed fails, memory dies without a line, ddp hangs past its limit,
    syncbn is skipped; every part gets its line and the exit status is 1."""
    fake = tmp_path / "python"
    fake.write_text("""#!/usr/bin/env bash
case "$2" in
  bf16) echo "PASS bf16 step equality vs fp32: fine" ;;
  speed) echo "FAIL step time vs open_clip_train distill K=1: ratio 2.0"; exit 1 ;;
  memory) echo "Traceback: boom" >&2; exit 3 ;;
  ddp) sleep 30 ;;
  syncbn) echo "SKIP SyncBatchNorm two-process equality: 1 GPU" ;;
esac
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PART_TIMEOUT_S": "2"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 1
    assert lines[0].startswith("PASS bf16") and lines[1].startswith("FAIL step time")
    assert lines[2].startswith("FAIL memory: exited with status 3") and "boom" in lines[2]
    assert lines[3] == "FAIL ddp: timed out after 2s" and lines[4].startswith("SKIP SyncBatchNorm")


@pytest.mark.slow
def test_python_parts_run_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "all", "--cpu-smoke"],
                          env=env, capture_output=True, text=True, timeout=1200)
    lines = [x for x in done.stdout.splitlines() if x.split(" ")[0] in ("PASS", "FAIL", "SKIP", "INFO")]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [x.split(":")[0] for x in lines] == [
        "PASS bf16 step equality vs fp32", "INFO step time vs open_clip_train distill K=1",
        "INFO step time vs open_clip_train contrastive K=4", "INFO peak memory vs estimate K=1",
        "INFO peak memory vs estimate K=4", "PASS two-process equality", "SKIP SyncBatchNorm two-process equality",
    ]
    # the speed lines time open_clip_train's own train_one_epoch (not the fallback mirror), at K = 1 with
    # --distill-model; at K = 4 open_clip_train cannot distill (its accumulation branch never calls dist_model)
    assert "theirs: open_clip_train.train_one_epoch with --distill-model" in lines[1]
    assert "with --accum-freq 4 and ClipLoss" in lines[2] and "dist_image_features" in lines[2]


@pytest.mark.slow
def test_speed_falls_back_to_the_mirror_without_open_clip_train(monkeypatch, capsys):
    """Where open_clip_train cannot be imported the K = 1 line times the hand mirror of train_one_epoch and
    says so, and the K = 4 line is SKIP."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(sys.modules, "open_clip_train.train", None)  # import raises ImportError
    import gpu_check

    assert gpu_check.part_speed(gpu_check.Setup.make(True, 256))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("INFO step time vs open_clip distill mirror K=1: ")
    assert "a mirror of train_one_epoch (open_clip_train not importable: " in lines[0]
    assert lines[1] == ("SKIP step time vs open_clip_train K=4: open_clip_train not importable; "
                        "the mirror covers K=1 only")
