"""Parameter counts of every model preset x size, built on the meta device (no memory, no init cost).

    python tools/count_params.py                       # all presets x all sizes
    python tools/count_params.py --presets atlas dla --sizes 170M 1.3B
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

from megatron_atlas.configs import available, compose, to_model_config  # noqa: E402
from megatron_atlas.model import build_model  # noqa: E402


@dataclass
class Row:
    preset: str
    size: str
    total: int
    non_embedding: int
    target: int                  # the size's nominal count (0 for sizes without one, e.g. tiny)

    @property
    def deviation_pct(self) -> Optional[float]:
        return 100.0 * (self.total - self.target) / self.target if self.target else None


def count(preset: str, size: str) -> Row:
    cfg = to_model_config(compose(preset, size))
    with torch.device("meta"):   # shapes only: a 1.3B model costs nothing
        model = build_model(cfg)
    return Row(preset, size, model.num_parameters(), model.num_parameters(exclude_embeddings=True),
               cfg.target_params)


def count_all(presets: Sequence[str], sizes: Sequence[str]) -> list[Row]:
    rows = [count(p, s) for s in sizes for p in presets]
    return sorted(rows, key=lambda r: r.target)   # smallest size first (stable: presets keep order)


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'preset':<12} {'size':>5} {'total':>15} {'non-embedding':>15} {'vs name':>8}"]
    for r in rows:
        dev = f"{r.deviation_pct:+.1f}%" if r.deviation_pct is not None else "-"
        lines.append(f"{r.preset:<12} {r.size:>5} {r.total:>15,} {r.non_embedding:>15,} {dev:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print total and non-embedding parameter counts for model presets x sizes, and for "
                    "sizes named by a count (170M, ...) the deviation from that count. Models are built "
                    "on the meta device, so the large sizes need no memory.")
    parser.add_argument("--presets", nargs="+", default=available("model"), metavar="NAME",
                        help=f"model presets (default: all: {', '.join(available('model'))})")
    parser.add_argument("--sizes", nargs="+", default=available("size"), metavar="NAME",
                        help=f"sizes (default: all: {', '.join(available('size'))})")
    args = parser.parse_args(argv)
    print(format_table(count_all(args.presets, args.sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
