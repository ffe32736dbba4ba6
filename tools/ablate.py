"""Ablation grid at CPU scale: variants x seeds on text (streaming vs sliding perplexity at 16x the
training length, needles) and associative recall (MQAR at growing numbers of pairs), written as a
table (mean +- std over seeds) and plots.

    python tools/ablate.py --shards data/stdlib-256                     # the default grid (~30 min, 2 cores)
    python tools/ablate.py --shards data/stdlib-256 --variants atlas-muon omeganet-gd --seeds 0 --tasks text
    python tools/ablate.py --shards data/stdlib-256 --docs docs          # also write docs/ablation_* tables and plots
    python tools/ablate.py --shards data/stdlib-256 --grid presets --tasks text --text-steps 100 --name presets

Runs land in --out (default runs/ablation); a finished run's result is reused when the grid runs again.
The variants are in megatron_atlas/eval/ablation.py (DEFAULT_VARIANTS).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_atlas.eval.ablation import GRIDS, Settings, markdown, plot, run_grid, summarise

TEXT_COLUMNS = ("text.val_loss", "text.streaming_ppl", "text.sliding_ppl", "text.streaming_over_sliding", "text.niah")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="text shards (tools/prepare_data.py), e.g. data/stdlib-256")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--docs", type=Path, default=None,
                   help="write <prefix>_tables.md, <prefix>.json and <prefix>_*.png here (prefix: --name)")
    p.add_argument("--name", default="ablation", help="file prefix under --docs")
    p.add_argument("--grid", default="default", choices=sorted(GRIDS),
                   help="default: the rule and the paper's orderings; presets: every memory preset as shipped")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the grid's variants (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=["text", "mqar"], choices=["text", "mqar"])
    p.add_argument("--text-steps", type=int, default=60)
    p.add_argument("--mqar-steps", type=int, default=60)
    p.add_argument("--long-tokens", type=int, default=2048, help="long-document length (16x the training length)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable)")
    args = p.parse_args(argv)
    known = {v.name: v for v in GRIDS[args.grid]}
    names = args.variants or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown variants {unknown} in grid {args.grid!r}; choose from {', '.join(known)}")
    variants = [known[n] for n in names]
    settings = Settings(shards=args.shards, seeds=args.seeds, tasks=args.tasks, text_steps=args.text_steps,
                        mqar_steps=args.mqar_steps, long_tokens=args.long_tokens, extra=tuple(args.extra))
    print(f"ablation: {len(variants)} variants x {len(args.tasks)} tasks x {len(args.seeds)} seeds -> {args.out}")
    results = run_grid(variants, settings, args.out, log=lambda m: print(m, flush=True))
    table = summarise(results, variants)
    mqar_columns = tuple(f"mqar.mqar_{n}" for n in settings.mqar_pairs_eval)
    text = markdown(table, variants, [c for c in TEXT_COLUMNS if "text" in args.tasks]) if "text" in args.tasks else ""
    recall = markdown(table, variants, ("mqar.val_loss",) + mqar_columns) if "mqar" in args.tasks else ""
    print("\n" + text + "\n\n" + recall)
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / f"{args.name}.json").write_text(json.dumps({"settings": vars(settings), "results": results},
                                                            indent=1, default=str))
        if "text" in args.tasks:
            plot(table, ("text.streaming_over_sliding", "text.sliding_ppl", "text.val_loss"),
                 args.docs / f"{args.name}_text.png", f"text, T={settings.seq_len}, {settings.text_steps} steps, "
                 f"long document {settings.long_tokens} tokens")
        if "mqar" in args.tasks:
            plot(table, mqar_columns, args.docs / f"{args.name}_mqar.png",
                 f"MQAR accuracy, trained at {settings.mqar_pairs_trained} pairs, {settings.mqar_steps} steps")
        (args.docs / f"{args.name}_tables.md").write_text(text + "\n\n" + recall + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
