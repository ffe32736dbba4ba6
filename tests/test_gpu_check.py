"""tools/gpu_check.py runs end to end (on CPU, at tiny sizes) and reports every section: the GPU
check has one lease to run in, so its own bugs must show up here first."""
from __future__ import annotations

import json
import math

from tools.gpu_check import PRESETS, main


def test_smoke_run_writes_every_section(tmp_path):
    result = main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(saved["kernels"]) == 2 and len(saved["training"]) == len(PRESETS) and len(saved["layers"]) == 2
    for row in result["kernels"]:
        assert row["triton"].startswith("not covered: "), row
        assert row["chunked"]["output_error"] < 2e-2 and row["chunked"]["worst_grad"] < 5e-2, row
    for row in result["training"]:
        assert "error" not in row, row
        assert row["finite"] and row["tokens_per_s"] > 0 and math.isfinite(row["mfu"]), row
    for row in result["layers"]:
        assert row["chunked"] > 0 and row["attention"] > 0, row
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| atlas | muon_block | 32 |" in table and "## 3. One memory layer" in table
