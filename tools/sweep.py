"""Scaling-law sweeps: plan, launch, collect, fit, plot. `python tools/sweep.py --help`.

    python tools/sweep.py all --config configs/sweep/tiny.yaml --out runs/sweep_tiny
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The fit solves thousands of 5-parameter problems: BLAS threads only add overhead there (7x measured
# on a busy 2-core machine). Set before numpy loads; the training runs are separate processes.
if "OPENBLAS_NUM_THREADS" not in os.environ:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["SWEEP_OPENBLAS_DEFAULTED"] = "1"   # the runner gives training runs their default back
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

from megatron_atlas.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
