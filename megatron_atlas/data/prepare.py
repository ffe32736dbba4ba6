"""Text -> token shards (the library behind tools/prepare_data.py; format in `data.shard_format`).

Documents are tokenized in worker processes (order kept), each gets the end-of-document token, and
each goes whole to `train` or `val` by a seeded hash of its text (so the split does not depend on the
order or the number of workers). Each split's token stream is cut into windows of `seq_len + 1` ids
(the tail shorter than a window is dropped and counted) and written as shards of
`samples_per_shard` windows. The output is a pure function of (inputs, tokenizer, arguments):
a rerun never duplicates a shard, leaves complete shards untouched (rewriting damaged ones), and
skips everything when index.json says the same job is done and every shard it lists is there with
its size and checksum file. "The same job" compares the inputs' contents (sha256), not only their
paths and sizes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from megatron_atlas.atomic import replaced_on_success
from megatron_atlas.data.documents import iter_documents
from megatron_atlas.data.fast_bpe import FastByteLevelEncoder
from megatron_atlas.data.shard_format import (DTYPES, FORMAT, INDEX, TOKENIZER, read_index, shard_name,
                                              shard_size, token_dtype, write_json_atomic, write_shard)
from megatron_atlas.data.tokenizer import Tokenizer, train_bpe

SPLITS = ("train", "val")
PLAN = "prepare.json"   # the job's fingerprint, written first: a rerun must match it


@dataclass
class PrepareArgs:
    out_dir: str
    seq_len: int = 2048
    tokenizer: Optional[str] = None        # a tokenizer.json; None: train a byte-level BPE
    vocab_size: int = 8192                 # for the trained BPE
    tokenizer_train_mb: float = 50.0       # text the BPE is trained on (the first documents)
    val_fraction: float = 0.005
    seed: int = 0
    samples_per_shard: int = 0             # 0: about 64 MB per shard
    text_field: str = "text"
    skip_bad_files: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2.0 ** 64


# Worker state: set once per process by _init_worker (the tokenizer travels as its JSON).
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, seed: int, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the pool is the parallelism; no threads per worker
    tok = Tokenizer.from_json(tokenizer_json)
    _WORKER.update(tok=tok, encoder=FastByteLevelEncoder(tok), seed=seed, val_fraction=val_fraction)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """-> (train ids, val ids, train docs, val docs, fast-path mismatches); each document ends with
    the EOD id."""
    encoder, eod = _WORKER["encoder"], _WORKER["tok"].eod_id
    mismatched = encoder.mismatched_batches
    parts: dict[bool, list[list[int]]] = {False: [], True: []}
    for text, ids in zip(texts, encoder.encode_batch(texts)):
        parts[_is_val(text, _WORKER["seed"], _WORKER["val_fraction"])].append(ids + [eod])
    arrays = [np.fromiter(chain.from_iterable(parts[v]), dtype=np.uint32) for v in (False, True)]
    return arrays[0], arrays[1], len(parts[False]), len(parts[True]), encoder.mismatched_batches - mismatched


def _chunks(texts: Iterable[str], max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class SplitWriter:
    """Packs one split's token stream into windows and writes full shards as they fill."""

    def __init__(self, root: Path, split: str, seq_len: int, samples_per_shard: int, dtype: str) -> None:
        self.root, self.split, self.window = root, split, seq_len + 1
        self.per_shard, self.dtype = samples_per_shard, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = 0

    def add(self, ids: np.ndarray, documents: int) -> None:
        self.documents += documents
        if len(ids):
            self.pending.append(ids)
            self.pending_tokens += len(ids)
        if self.pending_tokens >= self.per_shard * self.window:
            self._flush(final=False)

    def close(self) -> int:
        """Writes the last (partial) shard; returns the tokens dropped (shorter than one window)."""
        self._flush(final=True)
        return self.pending_tokens

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, np.uint32)
        shard_tokens = self.per_shard * self.window
        start = 0
        while len(stream) - start >= shard_tokens or (final and len(stream) - start >= self.window):
            n = min(self.per_shard, (len(stream) - start) // self.window)
            self._write(stream[start:start + n * self.window].reshape(n, self.window))
            start += n * self.window
        rest = stream[start:]
        self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)

    def _write(self, windows: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        first = sum(s["samples"] for s in self.shards)
        # Same plan, same bytes: a rerun leaves intact shards alone and rewrites damaged ones.
        integrity = write_shard(self.root / name, windows, first, self.dtype)
        self.shards.append({"name": name, "samples": len(windows), "tokens": int(windows.size), **integrity})


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _plan(args: PrepareArgs, files: Sequence[Path | str]) -> dict:
    """What determines the output: if a rerun's plan differs, the folder holds another job's shards."""
    # a local file by its contents; a URL (unknown without reading it) by its name alone
    inputs = [[str(p), p.stat().st_size, _file_sha256(p)] if isinstance(p, Path) and p.is_file()
              else [str(p), None, None] for p in files]
    keys = ("seq_len", "tokenizer", "vocab_size", "tokenizer_train_mb", "val_fraction", "seed",
            "samples_per_shard", "text_field", "skip_bad_files")
    plan = {k: getattr(args, k) for k in keys}
    plan["inputs_sha256"] = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    if args.tokenizer:
        plan["tokenizer_sha256"] = hashlib.sha256(Path(args.tokenizer).read_bytes()).hexdigest()
    return plan


def _load_or_train_tokenizer(args: PrepareArgs, files: Sequence[Path | str], root: Path,
                             log: Callable[[str], None]) -> Tokenizer:
    saved = root / TOKENIZER
    if saved.is_file():   # an interrupted run of the same plan trained it already
        return Tokenizer.from_file(saved)
    if args.tokenizer:
        tok = Tokenizer.from_file(args.tokenizer)
    else:
        budget = int(args.tokenizer_train_mb * 1e6)
        texts, size = [], 0
        for text in iter_documents(files, Counter(), text_field=args.text_field,
                                   skip_bad_files=args.skip_bad_files):
            texts.append(text)
            size += len(text)
            if size >= budget:
                break
        log(f"training a byte-level BPE of {args.vocab_size} ids on {size / 1e6:.1f} MB of text")
        tok = train_bpe(texts, args.vocab_size)
    with replaced_on_success(saved) as tmp:
        tok.save(tmp)
    return tok


def _output_problems(root: Path, index: dict) -> list[str]:
    """Shards index.json lists that are missing, of the wrong size or without their checksum file."""
    problems = []
    for split in index["splits"].values():
        for entry in split["shards"]:
            path = root / entry["name"]
            want = entry.get("bytes", shard_size(entry["samples"], index["seq_len"], index["dtype"]))
            if not path.is_file():
                problems.append(f"{entry['name']} is missing")
            elif path.stat().st_size != want:
                problems.append(f"{entry['name']} has {path.stat().st_size:,} bytes, not {want:,}")
            elif "crc32" in entry and not (root / entry["crc32"]).is_file():
                problems.append(f"{entry['crc32']} is missing")
    return problems


def prepare(args: PrepareArgs, files: Sequence[Path | str], log: Callable[[str], None] = print,
            counts: Optional[Counter] = None) -> dict:
    """Writes the shards and index.json of `files` into `args.out_dir`; returns the index. `counts`:
    what `expand_inputs` skipped (not_regular, outside_tree), reported in the index."""
    if args.seq_len < 1 or not 0.0 <= args.val_fraction < 1.0:
        raise ValueError("need seq_len >= 1 and 0 <= val_fraction < 1")
    root = Path(args.out_dir)
    plan = _plan(args, files)
    if args.overwrite and root.exists():
        if any(root.iterdir()) and not (root / PLAN).is_file():   # never wipe a folder we did not write
            raise ValueError(f"--overwrite: {root} is not a prepare_data output folder; not deleting it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    plan_path = root / PLAN
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ValueError(f"{root} holds shards of a different job (see {plan_path}); use another "
                         "folder or --overwrite")
    if (root / INDEX).is_file() and plan_path.is_file():
        problems = _output_problems(root, read_index(root))
        if not problems:
            log(f"{root / INDEX} exists for the same inputs and settings: nothing to do")
            return read_index(root)
        log(f"{root / INDEX} exists for the same job, but {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}: writing them again")
        (root / INDEX).unlink()
    write_json_atomic(plan_path, plan)

    tok = _load_or_train_tokenizer(args, files, root, log)
    dtype = token_dtype(tok.vocab_size)
    per_shard = args.samples_per_shard or max(1, (64 << 20) // ((args.seq_len + 1) * np.dtype(DTYPES[dtype]).itemsize))
    writers = {s: SplitWriter(root, s, args.seq_len, per_shard, dtype) for s in SPLITS}
    counts = Counter(counts or {})
    docs = iter_documents(files, counts, text_field=args.text_field, skip_bad_files=args.skip_bad_files)
    init = (tok.to_json(), args.seed, args.val_fraction)
    fast = FastByteLevelEncoder(tok)
    log("encoding with tiktoken (checked against the tokenizer on sampled documents)" if fast.active
        else f"encoding with the tokenizers library ({fast.fallback_reason})")
    start = last_log = time.perf_counter()

    def consume(results: Iterable[tuple[np.ndarray, np.ndarray, int, int, int]]) -> None:
        nonlocal last_log
        for train_ids, val_ids, n_train, n_val, mismatched in results:
            counts["fast_bpe_mismatch"] += mismatched
            writers["train"].add(train_ids, n_train)
            writers["val"].add(val_ids, n_val)
            now = time.perf_counter()
            if now - last_log >= 2.0:
                last_log = now
                log(_progress(counts, now - start, writers))

    if args.workers <= 1:
        _init_worker(*init)
        consume(map(_encode_chunk, _chunks(docs)))
    else:
        # fork would copy a tokenizer whose Rust threads may hold locks; spawn starts clean workers
        with mp.get_context("spawn").Pool(args.workers, _init_worker, init) as pool:
            consume(pool.imap(_encode_chunk, _chunks(docs)))
    dropped = {s: w.close() for s, w in writers.items()}
    elapsed = time.perf_counter() - start

    index = {"format": FORMAT, "seq_len": args.seq_len, "dtype": dtype, "vocab_size": tok.vocab_size,
             "eod_id": tok.eod_id, "tokenizer": {"file": TOKENIZER, "sha256": tok.sha256},
             "seed": args.seed, "val_fraction": args.val_fraction, "samples_per_shard": per_shard,
             "input": {k: counts[k] for k in ("files", "bytes", "documents")},
             "skipped": {k: counts[k] for k in ("non_utf8", "empty", "missing_field", "bad_json", "bad_files",
                                                    "no_text_member", "not_regular", "outside_tree")},
             "splits": {s: {"shards": w.shards, "documents": w.documents, "dropped_tokens": dropped[s],
                            "samples": sum(x["samples"] for x in w.shards),
                            "tokens": sum(x["tokens"] for x in w.shards)} for s, w in writers.items()}}
    write_json_atomic(root / INDEX, index)   # last: its presence means the folder is complete
    log(_progress(counts, elapsed, writers) + " | done")
    log("skipped: " + ", ".join(f"{k} {v}" for k, v in index["skipped"].items())
        + " (non_utf8 documents are kept, decoded with replacement)")
    if counts["fast_bpe_mismatch"]:
        log(f"{counts['fast_bpe_mismatch']} batches re-encoded by the tokenizer after tiktoken differed on "
            "a checked document")
    return index


def _progress(counts: Counter, elapsed: float, writers: dict[str, SplitWriter]) -> str:
    mb = counts["bytes"] / 1e6
    shards = ", ".join(f"{s} {len(w.shards)} shards" for s, w in writers.items())
    return (f"documents {counts['documents']} | {mb:.1f} MB | {mb / max(elapsed, 1e-9):.2f} MB/s | "
            f"{shards}")
