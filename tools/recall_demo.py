#!/usr/bin/env python
"""Recall demo: train tiny Titans, OmegaNet, Atlas and Transformer briefly on MQAR on the CPU, then
measure their associative-recall accuracy at growing numbers of key-value pairs.

Each model is trained by the project's training loop (`megatron_atlas.train.loop.train`, synthetic
MQAR data, `size=tiny train=tiny` plus the overrides below) into OUT/<preset>/, then evaluated by the
MQAR suite of `megatron_atlas.eval` on held-out sequences (another seed) at --eval-pairs pairs. It
prints a table and writes OUT/results.json and OUT/accuracy.png (accuracy against pairs, one line per
model). Chance is 1 / (vocab / 2) for a value. Budget: 600 steps x 8 x 64 = 307k training tokens per
model; on 2 idle cores the whole demo took 9.5 min, most of it Atlas (its Muon rule orthogonalises
every token's momentum). A model whose training diverges is reported in the table, not fatal.

    python tools/recall_demo.py                        # defaults: ~10 min
    python tools/recall_demo.py --steps 100 --presets transformer,titans   # quicker look

Runs resume (train.resume=auto): a model already trained to --steps in OUT is only evaluated, so
the presets may also be trained by separate processes (--presets NAME each) and then compared by one
more call with all of them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_atlas.configs import compose, to_model_config, to_train_config  # noqa: E402
from megatron_atlas.eval import report  # noqa: E402
from megatron_atlas.eval.lm import load_lm  # noqa: E402
from megatron_atlas.eval.suites import run_mqar  # noqa: E402
from megatron_atlas.train.loop import train  # noqa: E402

PRESETS = ("titans", "omeganet", "atlas", "transformer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/recall_demo", help="folder for the runs, results.json, accuracy.png")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of model presets")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32, help="MQAR vocabulary: keys from the lower half, values the upper")
    p.add_argument("--train-pairs", type=int, default=4, help="key-value pairs per training sequence")
    p.add_argument("--eval-pairs", default="1,2,4,8,12", help="comma list of pair counts to evaluate")
    p.add_argument("--eval-samples", type=int, default=128, help="held-out sequences per pair count")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every model")
    return p.parse_args(argv)


def train_one(preset: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = [f"train.steps={args.steps}", f"train.micro_batch_size={args.batch_size}",
                 f"train.seq_len={args.seq_len}", f"train.lr={args.lr}", f"train.seed={args.seed}",
                 f"train.warmup_steps={max(1, args.steps // 10)}", "train.eval_every=0",
                 f"train.log_every={max(1, args.steps // 5)}", "train.tensorboard=false", "train.keep_last=1",
                 "train.device=cpu", "train.precision=fp32", f"train.out_dir={out / preset}", "train.resume=auto",
                 f"train.data.mqar.vocab_size={args.vocab}", f"train.data.mqar.num_kv_pairs={args.train_pairs}",
                 *args.overrides]
    cfg = compose(preset, "tiny", "tiny", overrides)
    start = time.perf_counter()
    summary = train(to_model_config(cfg), to_train_config(cfg), log=lambda s: print(f"  [{preset}] {s}", flush=True))
    keep = ("first_loss", "final_loss", "eval_loss", "eval_accuracy", "tokens_per_s")
    return {"train_seconds": round(time.perf_counter() - start, 1), **{k: summary.get(k) for k in keep}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = [p for p in args.presets.split(",") if p]
    pairs = [int(x) for x in args.eval_pairs.split(",") if x]
    bad = [n for n in pairs if 4 * n > args.seq_len or n > args.vocab // 2 - 1]
    if bad:
        raise SystemExit(f"--eval-pairs {bad} do not fit --seq-len {args.seq_len} (<= seq_len/4) or "
                         f"--vocab {args.vocab} (<= vocab/2 - 1 keys)")
    results, begin = {}, time.perf_counter()
    for preset in presets:
        print(f"== {preset}: training {args.steps} steps x {args.batch_size} x {args.seq_len} tokens on MQAR "
              f"({args.train_pairs} pairs, vocab {args.vocab})", flush=True)
        try:
            info = train_one(preset, args, out)
        except FloatingPointError as err:   # one model's inner loop diverging must not end the demo
            print(f"  [{preset}] diverged: {err}", flush=True)
            results[preset] = {"rows": [], "diverged": str(err)}
            continue
        lm = load_lm(str(out / preset), name=preset)
        start = time.perf_counter()
        rows = run_mqar(lm, pairs, args.seq_len, args.vocab, args.eval_samples, seed=args.seed + 12345,
                        log=lambda s: print(s, flush=True))
        info["eval_seconds"] = round(time.perf_counter() - start, 1)
        results[preset] = {"rows": rows, **info}
    chance = 1 / (args.vocab - args.vocab // 2)
    print(f"\nMQAR accuracy on held-out sequences (seq_len {args.seq_len}, vocab {args.vocab}, "
          f"trained on {args.train_pairs} pairs; chance {chance:.3f}):")
    print(f"{'pairs':>12} " + " ".join(f"{p:>12}" for p in presets))
    def cell(preset: str, i: int) -> str:
        rows = results[preset]["rows"]
        return f"{rows[i]['accuracy']:>12.3f}" if rows else f"{'diverged':>12}"
    for i, n in enumerate(pairs):
        print(f"{n:>12} " + " ".join(cell(p, i) for p in presets))
    print(f"{'train s':>12} " + " ".join(f"{results[p].get('train_seconds', float('nan')):>12.1f}" for p in presets))
    meta = {"args": vars(args), "chance": chance, "total_seconds": round(time.perf_counter() - begin, 1)}
    report.write_json(results, out / "results.json", meta)
    report.plot(results, out / "accuracy.png", title=f"MQAR recall after {args.steps} CPU steps")
    print(f"wrote {out / 'results.json'} and {out / 'accuracy.png'} ({meta['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
