"""Per-step communication volume of each preset under tensor parallelism, measured vs predicted.

    python tools/bench_comm.py                         # every preset, tp=2, tiny, B=2, T=32, CPU gloo
    python tools/bench_comm.py --presets atlas transformer --seq-len 64 --by-label
    python tools/bench_comm.py --presets atlas_mag model.n_persist=2 --seq-len 30

For each preset it starts `--tp` gloo processes on this machine, builds the model at `--size`, and
runs one training step (forward, vocab-parallel cross entropy, backward, sequence-parallel grad
all-reduce) twice: plain TP and TP with sequence parallelism (SP). Every collective the code
actually issues is recorded through `megatron_atlas.parallel.collectives.record_comm` and summed
per kind; the prediction next to it is the closed formula of docs/parallelism.md, so a mismatch
means the code communicates more (or less) than documented.

Volumes are "logical" bytes: the size of the full tensor each collective works on (all-reduce and
reduce-scatter input, all-gather output). The "wire/rank" column converts them to the bytes each
rank sends with ring algorithms: 2 (tp-1)/tp of it for an all-reduce, (tp-1)/tp for the others.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

import torch  # noqa: E402

from megatron_atlas.configs import available, compose, to_model_config  # noqa: E402
from megatron_atlas.model import ModelConfig, build_model  # noqa: E402
from megatron_atlas.model.lm import resolve_ffn_hidden  # noqa: E402
from megatron_atlas.parallel import build_parallel_state  # noqa: E402
from megatron_atlas.parallel.collectives import record_comm  # noqa: E402
from megatron_atlas.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from megatron_atlas.parallel.grads import reduce_sequence_parallel_grads  # noqa: E402
from megatron_atlas.parallel.local_launch import run_local  # noqa: E402

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# TP region entries and exits per block (each mixer and the SwiGLU exits; MAG's two mixers share
# one entry), and d_model norms per block (their grads are all-reduced under SP)
ENTRIES = {"lmm": 2, "mag": 2, "mal": 3, "swa": 2, "attn": 2}
EXITS = {"lmm": 2, "mag": 3, "mal": 3, "swa": 2, "attn": 2}
NORMS = {"lmm": 2, "mag": 4, "mal": 3, "swa": 2, "attn": 2}


def predicted_bytes(cfg: ModelConfig, batch: int, seq_len: int, tp: int, sequence_parallel: bool,
                    elem: int = 4) -> Dict[str, int]:
    """Logical bytes per collective kind for one training step (see docs/parallelism.md)."""
    if tp == 1:
        return {}
    d, L = cfg.d_model, cfg.n_layers
    tokens = batch * seq_len                       # label positions
    stream = batch * (seq_len + cfg.n_persist) * d * elem   # one residual-stream activation
    out: Dict[str, int] = defaultdict(int)
    out["all_reduce"] += 3 * tokens * 4            # cross entropy: max, target logit, sum exp (fp32)
    if cfg.has_memory and cfg.memory.degree > 1:   # shared feature coefficients (bwd)
        out["all_reduce"] += L * (cfg.memory.degree + 1) * 4
    entries = L * ENTRIES[cfg.block] + 1            # + the LM head's entry
    exits = L * EXITS[cfg.block]
    if not sequence_parallel:
        # entry: all-reduce of the input gradient (bwd); exit: all-reduce of the partial sums (fwd)
        out["all_reduce"] += (entries + exits) * stream
        out["all_reduce"] += tokens * d * elem     # vocab-parallel embedding (fwd)
    else:
        # entry: all-gather (fwd) + reduce-scatter of its gradient (bwd); exit: reduce-scatter (fwd) +
        # all-gather of its gradient (bwd); the embedding is one more exit (its partial lookups)
        out["all_gather"] += (entries + exits + 1) * stream
        out["reduce_scatter"] += (entries + exits + 1) * stream
        sp_params = (L * NORMS[cfg.block] + 1 + cfg.n_persist) * d   # norm weights, persistent tokens
        out["all_reduce"] += sp_params * elem           # their gradients, once per step
    return dict(out)


def wire_bytes(op: str, logical: int, tp: int) -> float:
    factor = 2 * (tp - 1) / tp if op == "all_reduce" else (tp - 1) / tp
    return logical * factor


def _step_records(cfg: ModelConfig, parallel, batch: int, seq_len: int):
    torch.manual_seed(0)
    model = build_model(cfg, parallel=parallel)
    reduce_sequence_parallel_grads(model, parallel)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    with record_comm() as records:
        loss = vocab_parallel_cross_entropy(model(ids[:, :-1]), ids[:, 1:], parallel).mean()
        loss.backward()
    return records


def _worker(rank: int, world: int, jobs: List[tuple], batch: int, seq_len: int, by_label: bool) -> None:
    states = {False: build_parallel_state(tp_size=world),
              True: build_parallel_state(tp_size=world, sequence_parallel=True)}
    for preset, cfg in jobs:
        for sp, parallel in states.items():
            records = _step_records(cfg, parallel, batch, seq_len)
            if rank:
                continue
            measured: Dict[str, int] = defaultdict(int)
            labels: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
            for r in records:
                measured[r.op] += r.bytes
                labels[f"{r.op:<15} {r.label}"][0] += 1
                labels[f"{r.op:<15} {r.label}"][1] += r.bytes
            predicted = predicted_bytes(cfg, batch, seq_len, world, sp)
            total_wire = sum(wire_bytes(op, b, world) for op, b in measured.items())
            ok = all(measured.get(op, 0) == predicted.get(op, 0) for op in OPS)
            print(f"{preset:<12} {'tp+sp' if sp else 'tp':<6} calls={len(records):<4} "
                  + " ".join(f"{op}={measured.get(op, 0) / 1024:.1f}K(pred {predicted.get(op, 0) / 1024:.1f}K)"
                             for op in OPS if measured.get(op) or predicted.get(op))
                  + f"  wire/rank={total_wire / 1024:.1f}K  {'match' if ok else 'MISMATCH'}", flush=True)
            if by_label:
                for label, (count, nbytes) in sorted(labels.items()):
                    print(f"    {label:<60} x{count:<4} {nbytes / 1024:.1f}K")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="model presets (default: all)")
    parser.add_argument("--size", default="tiny", help="size preset (configs/size/*.yaml); default tiny")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel processes on this machine")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (divisible by --tp)")
    parser.add_argument("--by-label", action="store_true", help="also list volume per region function")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every preset, e.g. model.n_persist=2")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before the workers are killed")
    args = parser.parse_args(argv)
    presets = args.presets or available("model")
    jobs = [(p, resolve_ffn_hidden(to_model_config(compose(p, args.size, "tiny", args.overrides)).validate())) for p in presets]
    cfg0 = jobs[0][1]
    print(f"# tp={args.tp} size={args.size} B={args.batch} T={args.seq_len} d={cfg0.d_model} "
          f"L={cfg0.n_layers} V={cfg0.vocab_size} fp32; logical bytes per training step (K = KiB)", flush=True)
    run_local(_worker, world=args.tp, args=(jobs, args.batch, args.seq_len, args.by_label), timeout_s=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
