"""Tokenize text into webdataset token shards for training (format: megatron_atlas/data/shard_format.py).

    python tools/prepare_data.py --out data/stdlib --default-corpus --vocab-size 8192 --seq-len 2048
    python tools/prepare_data.py --out data/web corpus/ more.jsonl --tokenizer tokenizer.json
    python tools/prepare_data.py --out data/wds 'https://host/text-{000000..000099}.tar' --vocab-size 32000
    python tools/prepare_data.py --out data/s3 'pipe:aws s3 cp s3://bucket/text-{0000..0009}.tar -'
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

from megatron_atlas.data.documents import BadInputError, default_corpus, expand_inputs  # noqa: E402
from megatron_atlas.data.prepare import PrepareArgs, prepare  # noqa: E402
from megatron_atlas.errors import FaultError  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = PrepareArgs(out_dir="")
    p = argparse.ArgumentParser(
        description="Tokenize plain text files, folders of them, JSONL, Parquet or webdataset shards of text "
                    "(.tar with KEY.txt / KEY.json members; local, pipe:CMD or http(s):// URLs, brace "
                    "patterns) into fixed windows of "
                    "seq_len + 1 token ids, written as webdataset tar shards {split}-NNNNNN.tar plus "
                    "index.json. Reruns into the same folder skip complete work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="files, folders or shard URLs (.jsonl/.ndjson: JSONL, .parquet: "
                                             "Parquet, .tar / pipe: / http(s):// / {a..b}: webdataset, one "
                                             "document per sample; anything else: one plain-text document per file)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--default-corpus", action="store_true",
                   help="use the Python standard library's .py sources and .rst/.txt docs (no download)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="ids of the trained BPE, EOD included")
    p.add_argument("--tokenizer-train-mb", type=float, default=d.tokenizer_train_mb,
                   help="MB of text the BPE is trained on")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of documents held out for validation (chosen by a seeded hash)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--samples-per-shard", type=int, default=0, help="0: about 64 MB per shard")
    p.add_argument("--text-field", default=d.text_field,
                   help="JSONL field / Parquet column / webdataset .json field of the text")
    p.add_argument("--skip-bad-files", action="store_true", help="count unreadable files instead of failing")
    p.add_argument("--workers", type=int, default=d.workers, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="delete the output folder first")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    if bool(ns.inputs) == ns.default_corpus:
        print("error: give input files/folders or --default-corpus (not both)", file=sys.stderr)
        return 2
    skipped: Counter = Counter()   # FIFOs, broken links and links out of the input folders
    files = default_corpus() if ns.default_corpus else expand_inputs(ns.inputs, skipped)
    args = PrepareArgs(out_dir=ns.out, seq_len=ns.seq_len,
                       tokenizer=ns.tokenizer, vocab_size=ns.vocab_size,
                       tokenizer_train_mb=ns.tokenizer_train_mb, val_fraction=ns.val_fraction,
                       seed=ns.seed, samples_per_shard=ns.samples_per_shard, text_field=ns.text_field,
                       skip_bad_files=ns.skip_bad_files, workers=ns.workers, overwrite=ns.overwrite)
    try:
        prepare(args, files, log=lambda line: print(line, file=sys.stderr, flush=True), counts=skipped)
    except (BadInputError, FaultError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
