"""The evaluation suites: each runs one model over a grid of difficulty knobs and returns rows
(one per grid cell, with its accuracy and sample count) that report.py writes and plots."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_atlas.data.synthetic import accuracy, mqar_batch
from megatron_atlas.eval.lm import EvalLM
from megatron_atlas.eval.scoring import score_example
from megatron_atlas.eval.tasks import babilong_example, needle_example

Row = Dict[str, object]
Log = Callable[[str], None]


def _mean(values: Sequence[bool]) -> float:
    return sum(map(bool, values)) / len(values) if values else float("nan")


def run_niah(lm: EvalLM, lengths: Sequence[int], depths: Sequence[float], kinds: Sequence[str],
             samples: int, seed: int, log: Log = print) -> List[Row]:
    """Needle in a haystack, scored by exact match of the greedy continuation."""
    rows = []
    for length in lengths:
        for kind in kinds:
            for depth in depths:
                start = time.perf_counter()
                scores = [score_example(lm, needle_example(lm.tokenizer, length, depth, kind, seed, i))
                          for i in range(samples)]
                acc = _mean([s["exact"] for s in scores])
                rows.append({"suite": "niah", "length": length, "kind": kind, "depth": depth,
                             "accuracy": acc, "n": samples, "sample_output": scores[0]["generated"]})
                log(f"  [{lm.name}] niah length {length} {kind} depth {depth:.2f}: {acc:.2f} "
                    f"({time.perf_counter() - start:.1f} s)")
    return rows


def run_babilong(lm: EvalLM, lengths: Sequence[int], tasks: Sequence[str], samples: int, seed: int,
                 n_facts: int = 4, log: Log = print) -> List[Row]:
    """BABILong-style qa1/qa2, scored by argmax over the candidate places (chance 1/6)."""
    rows = []
    for task in tasks:
        for length in lengths:
            start = time.perf_counter()
            scores = [score_example(lm, babilong_example(lm.tokenizer, length, task, seed, i, n_facts))
                      for i in range(samples)]
            acc = _mean([s["candidate"] for s in scores])
            rows.append({"suite": f"babilong_{task}", "length": length, "n_facts": n_facts,
                         "accuracy": acc, "exact": _mean([s["exact"] for s in scores]), "n": samples})
            log(f"  [{lm.name}] babilong {task} length {length}: {acc:.2f} "
                f"({time.perf_counter() - start:.1f} s)")
    return rows


@torch.no_grad()
def run_mqar(lm: EvalLM, kv_pairs: Sequence[int], seq_len: int, vocab_size: Optional[int], samples: int,
             seed: int, power_a: float = 0.01, batch_size: int = 16, log: Log = print) -> List[Row]:
    """Associative recall (data.synthetic MQAR, power-law query gaps): argmax accuracy on values."""
    vocab = vocab_size or lm.vocab_size
    rows = []
    for n in kv_pairs:
        generator = torch.Generator().manual_seed(seed * 1000 + n)
        correct, count = 0.0, 0
        for first in range(0, samples, batch_size):
            b = min(batch_size, samples - first)
            ids, labels = mqar_batch(b, seq_len, vocab, n, generator=generator, power_a=power_a)
            k = int((labels != -100).sum())
            correct += accuracy(lm.forward(ids), labels) * k
            count += k
        acc = correct / max(1, count)
        rows.append({"suite": "mqar", "num_kv_pairs": n, "length": seq_len, "vocab_size": vocab,
                     "power_a": power_a, "accuracy": acc, "n": samples, "queries": count})
        log(f"  [{lm.name}] mqar {n} pairs (seq {seq_len}, vocab {vocab}): {acc:.3f}")
    return rows
