"""One memory layer's forward+backward time against the sequence length (linear in T is the goal).

    python tools/bench_scaling.py                                  # T = 1K .. 16K, d 256, 4 heads, MLP x4
    python tools/bench_scaling.py --lengths 2048 8192 --preset atlas --size tiny

Prints tokens/s per length and time(8K) / time(2K) (4.00 is linear; target <= 4.5). The header
says whether this thread flushes subnormals (the memory operator's CPU workers always do).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, Optional, Sequence

import torch

from megatron_atlas.benchmark import (add_layer_arguments, add_run_arguments, layer_config, print_timing,
                                      random_input, start_run, time_fwd_bwd, verdict)
from megatron_atlas.model.memory_layer import MemoryLayer

TARGET_8K_OVER_2K = 4.5


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    add_layer_arguments(p)
    args = p.parse_args(argv)
    device, env = start_run("bench_scaling", args)
    cfg = layer_config(args)
    torch.manual_seed(args.seed)
    layer = MemoryLayer(cfg).to(device)
    print(f"\nchunked fwd+bwd vs length, B={args.batch}: {cfg.memory}")
    rows = []
    for length in args.lengths:
        timing, _ = time_fwd_bwd(f"T={length}", layer, random_input(args.batch, length, cfg.d_model, device, args.seed),
                                 args.warmup, args.repeats)
        print_timing(timing)
        rows.append(timing.as_dict())
    result: Dict[str, object] = {"environment": env, "rows": rows}
    by_length = {r["length"]: r["median_s"] for r in rows}
    if 2048 in by_length and 8192 in by_length:
        ratio = by_length[8192] / by_length[2048]
        print(f"  time(8K) / time(2K) = {ratio:.2f} (4.00 = linear; {verdict(ratio, TARGET_8K_OVER_2K, False)})")
        result["ratio_8k_over_2k"] = ratio
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
