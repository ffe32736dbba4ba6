"""One memory layer, forward+backward on CPU (or a GPU): the chunked dual form against the token-loop
reference, and the layer's achieved GFLOP/s against this machine's fp32 matmul rate.

    python tools/bench_operator.py                          # d 256, 4 heads, MLP memory x4, chunk 64, T=2048
    python tools/bench_operator.py --skip-reference --length 8192 --preset atlas --size 170M

Prints: the timings (median of --repeats), the speed-up chunked / reference (target >= 10x), and
GFLOP/s = the layer's FLOPs (torch's counter, on the meta device) / its median time, next to the
rate of batched fp32 matmuls of the recurrence's own shapes on this machine (goal >= 70%).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Dict, Optional, Sequence

import torch

from megatron_atlas.benchmark import (add_layer_arguments, add_run_arguments, counted_flops, layer_config,
                                      matmul_rate, print_timing, random_input, start_run, time_fwd_bwd, verdict)
from megatron_atlas.model.config import ModelConfig
from megatron_atlas.model.memory_layer import MemoryLayer

TARGET_CHUNKED_VS_REFERENCE = 10.0
GOAL_SHARE_OF_MATMUL_RATE = 0.7


def recurrence_shapes(cfg: ModelConfig, batch: int) -> list:
    """The batched matmuls one chunk step of the memory makes most of: the window's features
    against the first layer's state, and the hidden layer's."""
    heads, chunk = cfg.n_heads, cfg.memory.chunk
    d_v, hidden = cfg.resolved_head_dim, cfg.memory.expansion * cfg.resolved_head_dim
    from kernels.memory import feature_dim
    width = feature_dim(cfg.mem_key_dim, cfg.memory.degree)
    rows = batch * heads
    if cfg.memory.kind == "linear":
        return [(rows, chunk, width, d_v), (rows, d_v, chunk, width)]
    return [(rows, chunk, width, hidden), (rows, chunk, hidden, d_v), (rows, hidden, chunk, width),
            (rows, d_v, chunk, hidden)]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--reference-repeats", type=int, default=1, help="timed passes of the slow token loop")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    add_layer_arguments(p)
    args = p.parse_args(argv)
    device, env = start_run("bench_operator", args)
    cfg = layer_config(args)
    print(f"\nMemoryLayer fwd+bwd, B={args.batch} T={args.length}: {cfg.memory}")
    x = random_input(args.batch, args.length, cfg.d_model, device, args.seed)
    torch.manual_seed(args.seed)
    layer = MemoryLayer(cfg).to(device)
    chunked, y_chunked = time_fwd_bwd("chunked", layer, x, args.warmup, args.repeats)
    print_timing(chunked)
    result: Dict[str, object] = {"environment": env, "config": dataclasses.asdict(cfg.memory),
                                 "chunked": chunked.as_dict()}
    flops = counted_flops(lambda: MemoryLayer(cfg), (args.batch, args.length, cfg.d_model))
    achieved = flops / chunked.median / 1e9
    best = flops / chunked.best / 1e9
    ceiling = matmul_rate(recurrence_shapes(cfg, args.batch), device)
    share = achieved / ceiling
    print(f"  {flops / 1e9:.1f} GFLOP per pass (counted): {achieved:.1f} GFLOP/s median, {best:.1f} fastest; "
          f"this machine's fp32 bmm on the recurrence's shapes: {ceiling:.1f} GFLOP/s -> {share:.0%} "
          f"(goal >= {GOAL_SHARE_OF_MATMUL_RATE:.0%})")
    result.update(gflop=flops / 1e9, achieved_gflops=achieved, matmul_gflops=ceiling, share=share)
    if not args.skip_reference:
        reference_cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, impl="reference"))
        reference_layer = MemoryLayer(reference_cfg).to(device)
        reference_layer.load_state_dict(layer.state_dict())
        reference, y_reference = time_fwd_bwd("reference (token loop)", reference_layer, x, 0, args.reference_repeats)
        print_timing(reference)
        ratio = reference.median / chunked.median
        print(f"  speed-up chunked / reference: {ratio:.1f}x ({verdict(ratio, TARGET_CHUNKED_VS_REFERENCE, True)}); "
              f"max |y_chunked - y_reference| = {(y_chunked - y_reference).abs().max().item():.2e}")
        result.update(reference=reference.as_dict(), speedup=ratio)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
