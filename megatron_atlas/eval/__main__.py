"""python -m megatron_atlas.eval MODEL [MODEL ...] --out DIR [options]: see --help."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_atlas.errors import FaultError
from megatron_atlas.eval import perplexity, report, suites
from megatron_atlas.eval.lm import EvalLM, load_lm, unique_names
from megatron_atlas.eval.tasks import NEEDLE_KINDS

SUITES = ("ppl", "long_ppl", "niah", "babilong", "mqar")
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536"

EPILOG = """\
models: a native run folder (its latest checkpoint), a step-XXXXXXXX folder, a consolidated
state-dict file with config.yaml beside it, an exported Hugging Face folder of this project, or any
Hugging Face causal LM folder. Text suites encode with the model's tokenizer: --tokenizer, else the
export's tokenizer.json or the run's shard folder's, else the byte-level tokenizer (id = byte).

suites:
  ppl       perplexity on --shards (split --split), --ppl-batches batches of --ppl-batch-size
  long_ppl  one long document (the first --doc-tokens of the split's packed stream, or --doc FILE):
            sliding windows (--window, --stride; only new tokens scored) and a streaming read
            through the recurrent cache (every token sees its full history)
  niah      needle in a haystack at --lengths, --depths, --needles (number word uuid); exact match
            of the greedy continuation
  babilong  qa1 (where is a person after moves) and qa2 (where is the object a person carries),
            --facts facts hidden in filler at --lengths; argmax over the 6 candidate places
  mqar      associative recall at --kv-pairs (power-law query gaps --power-a, --mqar-seq-len,
            --mqar-vocab, default the run's training MQAR vocabulary); argmax accuracy
Everything generated is deterministic from --seed.

outputs in --out: results.json (every row, plus per-suite curves) and accuracy.png (accuracy
against context length, MQAR against pairs; one line per model).

examples:
  python -m megatron_atlas.eval runs/atlas-tiny runs/transformer-tiny --out runs/eval --suites mqar
  python -m megatron_atlas.eval hf/atlas-170M --shards data/fineweb --suites ppl,long_ppl,niah,babilong \\
      --lengths 1024,4096,16384,65536 --samples 5 --out runs/eval-170M
"""


def _ints(text: str) -> List[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x]


def _names(text: str, allowed: Sequence[str], what: str) -> List[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return names


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_atlas.eval", description=(
        "Evaluate one or more models on perplexity and long-context recall suites; writes "
        "results.json and a plot to --out. Without --suites it runs niah, babilong and mqar, the "
        "text suites at --lengths 1K-64K (see the defaults below)."), epilog=EPILOG,
        formatter_class=_HelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoints or Hugging Face folders to compare")
    p.add_argument("--out", required=True, help="run folder for results.json and accuracy.png")
    p.add_argument("--suites", default="niah,babilong,mqar", help=f"comma list of {', '.join(SUITES)}")
    p.add_argument("--names", default="", help="comma list of labels for the models (default: folder names)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or a folder holding one) for text suites")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=5, help="examples per grid cell (niah, babilong)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, type=_ints,
                   help="prompt lengths in tokens (niah, babilong)")
    p.add_argument("--depths", default="0.1,0.5,0.9", type=_floats, help="needle depths in [0, 1]")
    p.add_argument("--needles", default="number,word,uuid", help=f"needle kinds: {', '.join(NEEDLE_KINDS)}")
    p.add_argument("--babilong-tasks", default="qa1,qa2")
    p.add_argument("--facts", type=int, default=4, help="facts per BABILong example")
    p.add_argument("--kv-pairs", default="2,4,8,16,32", type=_ints, help="MQAR key-value pair counts")
    p.add_argument("--mqar-seq-len", type=int, default=256)
    p.add_argument("--mqar-vocab", type=int, default=None)
    p.add_argument("--mqar-samples", type=int, default=64)
    p.add_argument("--power-a", type=float, default=0.01, help="MQAR query gap law p(g) ~ a g^(a-1)")
    p.add_argument("--shards", default=None, help="shard folder (index.json) for ppl and long_ppl")
    p.add_argument("--split", default="val")
    p.add_argument("--ppl-batches", type=int, default=8)
    p.add_argument("--ppl-batch-size", type=int, default=4)
    p.add_argument("--doc", default=None, help="text file for long_ppl (instead of the shard stream)")
    p.add_argument("--doc-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per cached step on long prompts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a Hugging Face folder run its own Python model code (auto_map); this project's "
                        "exports never need it here (they load from their weights and config.json)")
    return p


def _lengths(lengths: Sequence[int]) -> str:
    return ",".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)


def _mqar_vocab(lm: EvalLM, given: Optional[int]) -> Optional[int]:
    if given:
        return given
    data = (lm.run_config.get("train") or {}).get("data") or {}
    if data.get("kind") == "synthetic_mqar":
        return (data.get("mqar") or {}).get("vocab_size")
    return None


def evaluate_model(lm: EvalLM, args: argparse.Namespace, chosen: Sequence[str], log=print) -> dict:
    entry: dict = {"rows": []}
    if "ppl" in chosen or "long_ppl" in chosen:
        if not args.shards and not (args.doc and "ppl" not in chosen):
            raise SystemExit("ppl/long_ppl need --shards (long_ppl alone also takes --doc FILE)")
    if "ppl" in chosen:
        entry["ppl"] = perplexity.shard_perplexity(lm, args.shards, args.split, args.ppl_batches,
                                                   args.ppl_batch_size)
        log(f"  [{lm.name}] val perplexity {entry['ppl']['perplexity']:.3f} ({entry['ppl']['tokens']} tokens)")
    if "long_ppl" in chosen:
        if args.doc:
            ids = torch.tensor(lm.encode(Path(args.doc).read_text(encoding="utf-8"))[:args.doc_tokens + 1])
        else:
            ids = perplexity.shard_document(args.shards, args.split, args.doc_tokens)
        entry["long_ppl"] = {
            "tokens": int(ids.numel() - 1), "window": args.window, "stride": args.stride,
            "sliding": perplexity.sliding_perplexity(lm, ids, args.window, args.stride),
            "streaming": perplexity.streaming_perplexity(lm, ids)}
        log(f"  [{lm.name}] long document ({ids.numel() - 1} tokens): sliding "
            f"{entry['long_ppl']['sliding']['perplexity']:.3f}, streaming "
            f"{entry['long_ppl']['streaming']['perplexity']:.3f}")
    if "niah" in chosen:
        cells = len(args.lengths) * len(args.depths) * len(_names(args.needles, NEEDLE_KINDS, "needle"))
        log(f"  [{lm.name}] niah: {cells} cells x {args.samples} samples at lengths {_lengths(args.lengths)}")
        entry["rows"] += suites.run_niah(lm, args.lengths, args.depths, _names(args.needles, NEEDLE_KINDS, "needle"),
                                         args.samples, args.seed, log)
    if "babilong" in chosen:
        tasks = _names(args.babilong_tasks, ("qa1", "qa2"), "task")
        log(f"  [{lm.name}] babilong {','.join(tasks)}: {len(tasks) * len(args.lengths)} cells x "
            f"{args.samples} samples at lengths {_lengths(args.lengths)}")
        entry["rows"] += suites.run_babilong(lm, args.lengths, _names(args.babilong_tasks, ("qa1", "qa2"), "task"),
                                             args.samples, args.seed, args.facts, log)
    if "mqar" in chosen:
        entry["rows"] += suites.run_mqar(lm, args.kv_pairs, args.mqar_seq_len, _mqar_vocab(lm, args.mqar_vocab),
                                         args.mqar_samples, args.seed, args.power_a, log=log)
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = _names(args.suites, SUITES, "suite")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.names.split(",") if n]
    if names and len(names) != len(args.models):
        raise SystemExit(f"--names has {len(names)} labels for {len(args.models)} models")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"suites {', '.join(chosen)}; results go to {out}", flush=True)
    lms = []
    for i, spec in enumerate(args.models):
        print(f"loading {spec}", flush=True)
        try:
            lm = load_lm(spec, args.tokenizer, names[i] if names else None,
                         trust_remote_code=args.trust_remote_code)
        except (ValueError, FaultError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        lm.prefill_chunk = args.prefill_chunk
        lms.append(lm)
    unique_names(lms)
    results = {}
    for lm in lms:
        start = time.perf_counter()
        print(f"evaluating {lm.name} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f}M params): "
              f"{', '.join(chosen)}", flush=True)
        results[lm.name] = evaluate_model(lm, args, chosen, log=lambda s: print(s, flush=True))
        results[lm.name]["seconds"] = round(time.perf_counter() - start, 2)
    meta = {"argv": list(sys.argv[1:] if argv is None else argv), "models": dict(zip([l.name for l in lms], args.models)),
            "seed": args.seed, "suites": chosen}
    report.write_json(results, out / "results.json", meta)
    plotted = report.plot(results, out / "accuracy.png")
    print(f"wrote {out / 'results.json'}" + (f" and {out / 'accuracy.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
