"""Data pipeline throughput on the default corpus (the Python standard library's sources and docs).

Prints prepare_data's input MB/s with `--workers` tokenizer processes (tokenizer trained beforehand,
so the figure is tokenize + pack + write) and the shard loader's tokens/s delivered to one process.

    python tools/bench_data.py [--workers 2] [--seq-len 2048] [--batch-size 8] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

from megatron_atlas.data.documents import default_corpus, iter_documents  # noqa: E402
from megatron_atlas.data.prepare import PrepareArgs, prepare  # noqa: E402
from megatron_atlas.data.shards import ShardSource  # noqa: E402
from megatron_atlas.data.tokenizer import train_bpe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="how long the loader is timed")
    p.add_argument("--out", help="shard folder (default: a temporary one)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        out = Path(a.out or tmp) / "shards"
        files = default_corpus()
        t = time.perf_counter()
        sample = []
        for text in iter_documents(files, Counter()):
            sample.append(text)
            if sum(map(len, sample)) > 5e6:
                break
        tok_path = Path(tmp) / "tokenizer.json"
        train_bpe(sample, a.vocab_size).save(tok_path)
        print(f"tokenizer: byte-level BPE of {a.vocab_size} ids trained on 5 MB in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        index = prepare(PrepareArgs(out_dir=str(out), seq_len=a.seq_len, tokenizer=str(tok_path),
                                    workers=a.workers, overwrite=True), files, log=lambda line: None)
        elapsed = time.perf_counter() - t
        mb = index["input"]["bytes"] / 1e6
        tokens = sum(s["tokens"] for s in index["splits"].values())
        print(f"prepare_data: {mb:.1f} MB, {index['input']['documents']} documents, {tokens / 1e6:.1f}M tokens "
              f"in {elapsed:.1f} s with {a.workers} workers: {mb / elapsed:.2f} MB/s, "
              f"{tokens / elapsed / 1e6:.2f}M tokens/s")

        source = ShardSource(out, "train", batch_size=a.batch_size, seed=0)
        t = time.perf_counter()
        source.batch(0)   # opens (indexes and maps) the shards the first batch touches
        print(f"loader: first batch (opening shards) {1e3 * (time.perf_counter() - t):.1f} ms")
        for i in range(1, 2000):   # touch every shard once so the timing below is the steady state
            source.batch(i)
        n, count, t = 0, 0, time.perf_counter()
        while time.perf_counter() - t < a.seconds:
            x, _ = source.batch(count)
            n += x.numel()
            count += 1
        elapsed = time.perf_counter() - t
        print(f"loader: {count} batches of {a.batch_size} x {source.seq_len} in {elapsed:.1f} s: "
              f"{n / elapsed / 1e6:.2f}M tokens/s to one process ({1e6 * elapsed / count:.0f} us/batch)")


if __name__ == "__main__":
    main()
