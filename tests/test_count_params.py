"""tools/count_params.py: every preset at every paper size lands within 10% of the size's name."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "count_params.py"


def _tool():
    spec = importlib.util.spec_from_file_location("count_params", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_paper_sizes_land_within_ten_percent_of_their_names(capsys):
    tool = _tool()
    rows = tool.count_all(tool.available("model"), ["170M", "340M", "760M", "1.3B"])
    assert len(rows) == 4 * len(tool.available("model"))
    for row in rows:
        assert 0 < row.non_embedding < row.total
        assert abs(row.deviation_pct) <= 10.0, row
    assert tool.main(["--presets", "atlas", "--sizes", "tiny", "170M"]) == 0
    table = capsys.readouterr().out
    assert "atlas" in table and "170M" in table and "%" in table
