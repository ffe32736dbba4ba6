"""Registers, spilled stack and shared memory of the Triton kernels, compiled ahead of time for sm_80
and sm_90 (no GPU needed): what each launch variant costs a multiprocessor.

    python -m kernels.memory.triton.resources              # the production shapes (d = 64, bf16)
    python -m kernels.memory.triton.resources --all        # every launchable variant (slow)
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

import torch

from kernels.triton_support import LaunchConfig, compile_ahead, compiled_stats

from ..types import MemoryConfig
from .linear import all_linear_metas, linear_launch_configs, linear_meta
from .mlp import all_mlp_metas, mlp_launch_configs, mlp_meta


def representative_configs() -> List[LaunchConfig]:
    """The production shape d = 64 at every chunk size, bf16, with and without a window."""
    from kernels.newton_schulz.triton_ns import launch_config
    configs = []
    for chunk in (16, 32, 64):
        for window in (1, 4):
            meta = linear_meta(MemoryConfig("linear", "gd", "l2", window, chunk), 64, torch.bfloat16)
            configs += [c for c in linear_launch_configs(torch.bfloat16, meta) if "save=0" not in c.name]
        for window in sorted({1, min(chunk + 1, 65 - chunk)}):   # MLP: c - 1 <= b, b + c - 1 <= 64
            meta = mlp_meta(MemoryConfig("mlp", "gd", "l2", window, chunk, anchor=False), 64, 64, torch.bfloat16)
            configs += [c for c in mlp_launch_configs(torch.bfloat16, meta) if "save=0" not in c.name]
    return configs + [launch_config(64, 64), launch_config(64, 128)]


def every_config() -> List[LaunchConfig]:
    from kernels.newton_schulz.triton_ns import all_launch_configs
    configs = [c for dtype, meta in all_linear_metas() for c in linear_launch_configs(dtype, meta)]
    configs += [c for dtype, meta in all_mlp_metas() for c in mlp_launch_configs(dtype, meta)]
    return configs + all_launch_configs()


def resources(configs: Sequence[LaunchConfig], capabilities=(80, 90), log=print) -> List[Dict[str, object]]:
    rows = []
    log(f"{'kernel variant':<58} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem KiB':>8}")
    for config in configs:
        for capability in capabilities:
            stats = compiled_stats(compile_ahead(config, capability))
            rows.append({"kernel": config.name, "sm": capability, "num_warps": config.num_warps,
                         "num_stages": config.num_stages, "registers": stats.registers,
                         "spill_stack_bytes": stats.stack_bytes, "shared_bytes": stats.shared_bytes})
            log(f"{config.name:<58} {capability:>3} {config.num_warps:>5} {config.num_stages:>6} "
                f"{stats.registers!s:>5} {stats.stack_bytes!s:>7} {stats.shared_bytes / 1024:8.1f}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every launchable variant, not the production shapes")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = resources(every_config() if args.all else representative_configs(), log=lambda m: print(m, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
