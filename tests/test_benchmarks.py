"""The benchmark scripts run and print measured numbers (tiny sizes: this checks the scripts, not speed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_operator_reports_chunked_reference_and_share_of_the_matmul_rate():
    text = _run("tools/bench_operator.py", "--length", "64", "--d-model", "32", "--heads", "2", "--chunk", "16",
                "--repeats", "1", "--warmup", "0")
    assert "flush_to_zero=False" in text and "malloc=" in text
    assert "speed-up chunked / reference:" in text and "GFLOP/s median" in text


def test_bench_scaling_reports_the_ratio():
    text = _run("tools/bench_scaling.py", "--lengths", "2048", "8192", "--d-model", "16", "--heads", "1",
                "--expansion", "1", "--repeats", "1", "--warmup", "0")
    assert "time(8K) / time(2K) =" in text


@pytest.mark.parametrize("tool", ["tools/bench_operator.py", "tools/bench_scaling.py", "tools/bench_titans.py",
                                  "tools/cost.py", "tools/ablate.py"])
def test_help(tool):
    assert "usage:" in _run(tool, "--help")
