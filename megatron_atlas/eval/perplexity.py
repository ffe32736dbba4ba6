"""Perplexity on validation shards and on long documents.

Long documents are scored two ways:
  sliding    windows of `window` tokens every `stride` tokens, each run with a fresh state; only the
             tokens new to a window are scored, so every token is scored once with at least
             `window - stride` tokens of context (the standard fixed-context evaluation)
  streaming  the whole document read once through the recurrent cache (memory state + KV window)
             in chunks, every token scored with the full history: the natural evaluation of a
             recurrent-memory model, equal to one forward pass over the document
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from megatron_atlas.eval.lm import EvalLM


def _summary(nll: float, tokens: int) -> Dict[str, float]:
    mean = nll / max(1, tokens)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum"))


@torch.no_grad()
def shard_perplexity(lm: EvalLM, path: str | Path, split: str = "val", batches: int = 8,
                     batch_size: int = 4, seq_len: int | None = None) -> Dict[str, float]:
    """Mean loss over the first `batches` batches of a shard split (a fixed order, seed 0)."""
    from megatron_atlas.data.shards import ShardSource

    source = ShardSource(path, split, batch_size=batch_size, seq_len=seq_len, seed=0)
    nll, count = 0.0, 0
    for i in range(batches):
        ids, labels = source.batch(i)
        nll += _nll(lm.forward(ids), labels)
        count += labels.numel()
    return _summary(nll, count)


def shard_document(path: str | Path, split: str = "val", tokens: int = 65536) -> torch.Tensor:
    """Up to `tokens` + 1 ids of a split's packed token stream: its windows, in sample order, are
    consecutive non-overlapping slices of the stream (data.prepare), so they concatenate back."""
    from megatron_atlas.data.shards import ShardSource

    source = ShardSource(path, split, batch_size=1, seed=0)
    windows = min(source.num_samples, -(-(tokens + 1) // source.window))
    stream = source.windows(np.arange(windows)).reshape(-1)
    return torch.from_numpy(stream[:tokens + 1])


@torch.no_grad()
def sliding_perplexity(lm: EvalLM, ids: torch.Tensor, window: int, stride: int) -> Dict[str, float]:
    """`ids` [N]: scores targets ids[1:], each once, with fresh windows of `window` tokens."""
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in (0, window={window}]")
    nll, count, scored = 0.0, 0, 0        # scored: targets done so far (target t predicts ids[t + 1])
    total = ids.numel() - 1
    while scored < total:
        end = min(scored + stride, total)
        start = max(0, end - window)
        logits = lm.forward(ids[start:end][None])[0]
        new = end - scored
        nll += _nll(logits[-new:], ids[scored + 1:end + 1])
        count += new
        scored = end
    return _summary(nll, count)


@torch.no_grad()
def streaming_perplexity(lm: EvalLM, ids: torch.Tensor) -> Dict[str, float]:
    """`ids` [N]: every target scored with the full history, read through the cache in chunks."""
    logits, _ = lm.prefill(ids[None, :-1])
    return _summary(_nll(logits[0], ids[1:]), ids.numel() - 1)
