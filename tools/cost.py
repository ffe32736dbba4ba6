"""The cost of every model preset x size before a job starts: parameters, training FLOPs per token,
the ratio to `transformer`, peak training memory per GPU, and what impl="auto" runs on a GPU.

    python tools/cost.py                                   # every preset x 170M .. 1.3B at T=4096
    python tools/cost.py --presets atlas titans --sizes 760M --seq-len 8192 --markdown
    python tools/cost.py --presets atlas --sizes 760M --set model.memory.rule=muon   # the exact rule

Everything runs on the meta device (no memory, no arithmetic): FLOPs from the model's own ops
(`megatron_atlas.train.flops`), memory from a simulated forward and backward of one block and of
the LM head and loss (`megatron_atlas.train.cost`), for micro-batch 1 in bf16 with AdamW, per GPU
without tensor parallelism or ZeRO. The GPU column is the dispatch rule for bf16 inputs on an
sm_90 GPU (kernel variants compiled ahead of time to check their shared memory).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

from megatron_atlas.configs import available, compose, to_model_config
from megatron_atlas.model import build_model
from megatron_atlas.model.lm import resolve_ffn_hidden
from megatron_atlas.train.cost import GIB, estimates
from megatron_atlas.train.flops import training_flops_per_token

SIZES = ["170M", "340M", "760M", "1.3B"]


@dataclass
class CostRow:
    preset: str
    size: str
    rule: str
    params: int
    flops_per_token: float
    ratio_to_transformer: float
    memory_gb_checkpointed: float
    memory_gb_plain: float
    per_layer_gb: float
    gpu_impl: str
    gpu_reason: str


def gpu_impl(cfg) -> tuple[str, str]:
    """What impl="auto" picks for this model's memory layers on an sm_90 GPU with bf16 inputs."""
    if not cfg.has_memory:
        return "-", "no memory layer"
    from kernels.memory import MemoryConfig
    from kernels.triton_support import HAS_TRITON, SHARED_MEMORY_PER_BLOCK, DeviceLimits
    mem = cfg.memory
    if mem.impl != "auto":
        return mem.impl, "set by model.memory.impl"
    op = MemoryConfig(mem.kind, mem.rule, mem.loss, mem.window, mem.chunk, mem.degree, mem.ns_steps, mem.ns_block)
    if not HAS_TRITON:
        return "chunked?", "triton is not installed here, coverage not checked"
    from kernels.memory.triton import coverage_reason
    reason = coverage_reason(op, cfg.mem_key_dim, cfg.resolved_head_dim, torch.bfloat16,
                             DeviceLimits(90, SHARED_MEMORY_PER_BLOCK[90]))
    return ("triton", "covered") if reason is None else ("chunked", reason)


def cost_row(preset: str, size: str, seq_len: int, overrides: Sequence[str], transformer_flops: float) -> CostRow:
    cfg = resolve_ffn_hidden(to_model_config(compose(preset, size, overrides=list(overrides))))
    with torch.device("meta"):
        params = build_model(cfg).num_parameters()
    flops = training_flops_per_token(cfg, seq_len)
    memory = estimates(cfg, seq_len, parameters=params)
    checkpointed, plain = memory[True], memory[False]
    impl, reason = gpu_impl(cfg)
    return CostRow(preset, size, cfg.memory.rule if cfg.has_memory else "-", params, flops,
                   flops / transformer_flops, checkpointed.total / GIB, plain.total / GIB,
                   checkpointed.per_layer_kept / GIB, impl, reason)


def cost_table(presets: Sequence[str], sizes: Sequence[str], seq_len: int, overrides: Sequence[str] = (),
               progress=print) -> List[CostRow]:
    rows = []
    for size in sizes:
        base = training_flops_per_token(resolve_ffn_hidden(to_model_config(compose("transformer", size))), seq_len)
        for preset in presets:
            start = time.monotonic()
            rows.append(cost_row(preset, size, seq_len, overrides if preset != "transformer" else (), base))
            progress(f"  {preset} {size}: {time.monotonic() - start:.0f} s")
    return rows


def markdown(rows: Sequence[CostRow], seq_len: int) -> str:
    lines = [f"| preset | size | rule | params | GFLOP/token (T={seq_len}) | vs transformer | "
             "GB/GPU, block ckpt | GB/GPU, no ckpt | GB/layer kept | GPU impl (sm_90, bf16) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = r.gpu_impl if r.gpu_impl in ("triton", "-") else f"{r.gpu_impl}: {r.gpu_reason}"
        lines.append(f"| {r.preset} | {r.size} | {r.rule} | {r.params / 1e6:,.0f}M | {r.flops_per_token / 1e9:.2f} | "
                     f"{r.ratio_to_transformer:.2f}x | {r.memory_gb_checkpointed:.1f} | {r.memory_gb_plain:.1f} | "
                     f"{r.per_layer_gb:.2f} | {gpu} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[CostRow]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=available("model"))
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every listed preset but transformer (repeatable)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (default: aligned text)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = cost_table(args.presets, args.sizes, args.seq_len, args.overrides, progress=lambda m: print(m, file=sys.stderr))
    print(markdown(rows, args.seq_len))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
