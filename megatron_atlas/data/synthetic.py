"""Multi-query associative recall (MQAR), zoology style, generated from a seed.

One sequence of `seq_len` tokens:

    k1 v1 k2 v2 ... kN vN | filler ... kj vj ... filler ... ki vi ...
    (context: N pairs)      (each key queried once, at an even offset, followed by its value)

Keys are distinct and come from [1, V/2), values are distinct and come from [V/2, V). Query gaps are
drawn without replacement from p(g) ~ a * g^(a-1) (a = 0.01 favours short gaps). Filler is random
tokens (or 0). Inputs and labels are aligned LM style: `labels[:, t]` is the token at `t + 1` where
that token is a value to recall (so `logits[:, t]` is scored on it), and IGNORE_INDEX elsewhere.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1


def mqar_batch(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int, *,
               generator: torch.Generator, power_a: float = 0.01,
               random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(input_ids, labels)`, both LongTensor `[batch_size, seq_len]`."""
    check_mqar(seq_len, vocab_size, num_kv_pairs)
    n, half = num_kv_pairs, vocab_size // 2
    keys = 1 + _distinct(batch_size, half - 1, n, generator)
    values = half + _distinct(batch_size, vocab_size - half, n, generator)

    context = 2 * n
    slots = (seq_len - context) // 2          # query slots of two tokens after the context
    gap = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = (power_a * gap ** (power_a - 1)).expand(batch_size, slots)
    gaps = torch.multinomial(weights, n, replacement=False, generator=generator)
    query_pos = context + 2 * gaps            # [B, N]; the value follows at query_pos + 1

    if random_non_queries:
        tokens = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
    else:
        tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
    tokens[:, 0:context:2] = keys
    tokens[:, 1:context:2] = values
    tokens.scatter_(1, query_pos, keys)
    tokens.scatter_(1, query_pos + 1, values)
    labels = torch.full_like(tokens, IGNORE_INDEX).scatter_(1, query_pos, values)
    return tokens, labels


def check_mqar(seq_len: int, vocab_size: int, num_kv_pairs: int) -> None:
    """Raises ValueError unless N pairs, N queries and their gaps fit the length and vocabulary."""
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs={num_kv_pairs} must be in [1, seq_len/4] (seq_len={seq_len})")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} holds {vocab_size // 2 - 1} keys, fewer than "
                         f"num_kv_pairs={num_kv_pairs}")


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of the labelled positions whose argmax prediction is right (nan if none is labelled)."""
    mask = labels != ignore_index
    count = int(mask.sum())
    if count == 0:
        return float("nan")
    return float((logits.argmax(-1)[mask] == labels[mask]).sum()) / count


class MQARSource:
    """Batch `i` of a stream is a pure function of `(seed, i)`: any batch can be regenerated."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int, seed: int,
                 power_a: float = 0.01, random_non_queries: bool = True) -> None:
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.num_kv_pairs, self.seed = num_kv_pairs, seed
        self.power_a, self.random_non_queries = power_a, random_non_queries
        check_mqar(seq_len, vocab_size, num_kv_pairs)   # fail now, not at the first batch

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, index))
        return mqar_batch(self.batch_size, self.seq_len, self.vocab_size, self.num_kv_pairs,
                          generator=generator, power_a=self.power_a,
                          random_non_queries=self.random_non_queries)


def _distinct(rows: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct integers from [0, n) per row."""
    return torch.rand(rows, n, generator=generator).argsort(dim=1)[:, :k]


def _stream_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): nearby seeds and indices give unrelated generators."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)   # manual_seed wants a value that fits int64
