"""Cross entropy over (vocab-parallel) logits, in chunks of tokens, without gathering the vocabulary.

The one loss of training and evaluation, with or without TP. The logits stay in their own dtype
(bf16 under autocast): each chunk of tokens is upcast to fp32 on its own, in the forward and again
in the backward, so no fp32 copy of the whole [B, T, V] logits is ever made or kept for backward
([8, 4096, 32000] in fp32 is 4 GiB). Saved for backward: the logits themselves (no copy), the
labels and one fp32 log-sum-exp per token.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Group, _label, all_reduce
from .state import ParallelState

CHUNK_ELEMENTS = 1 << 24   # logits upcast at a time: 64 MiB in fp32 (about 500 tokens of a 32K vocab)


def vocab_parallel_cross_entropy(local_logits: Tensor, labels: Tensor, parallel: ParallelState | None,
                                 ignore_index: int = -100, chunk_tokens: int | None = None) -> Tensor:
    """Per-token loss [...] (float32) equal to F.cross_entropy(full_logits, labels, reduction="none").

    local_logits [..., V/tp] is this TP rank's contiguous vocab slice (rank r holds ids
    [r V/tp, (r+1) V/tp)); without TP (`parallel` None or tp=1) it is the full vocabulary. Three
    all-reduces of [...]-sized tensors: the max, the target logit and the sum of exponentials; the
    backward needs no communication. Positions whose label is ignore_index get loss 0 (and no
    gradient). `chunk_tokens`: tokens upcast at a time (default: CHUNK_ELEMENTS / V/tp).
    """
    group = None if parallel is None else parallel.tp_group
    rank = 0 if parallel is None else parallel.tp_rank
    vocab_local = local_logits.shape[-1]
    if labels.shape != local_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(local_logits.shape)}")
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // vocab_local)
    loss = _ChunkedCrossEntropy.apply(local_logits.reshape(-1, vocab_local), labels.reshape(-1), group,
                                      rank * vocab_local, ignore_index, chunk)
    return loss.view(labels.shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)   # bf16/fp16 -> fp32, fp64 stays


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: Group, vocab_start: int, ignore_index: int,
                chunk: int) -> Tensor:
        n, vocab_local = logits.shape
        dtype = _compute_dtype(logits.dtype)
        mine, local_ids = _local_targets(labels, vocab_start, vocab_local)
        row_max = logits.new_empty(n, dtype=dtype)
        for rows in _chunks(n, chunk):   # any per-row constant works for stability; the max keeps exp() <= 1
            row_max[rows] = logits[rows].max(dim=-1).values.to(dtype)
        with _label("vocab_parallel_cross_entropy.max"):
            row_max = all_reduce(row_max, group, op=dist.ReduceOp.MAX)
        sum_exp, target = torch.empty_like(row_max), torch.empty_like(row_max)
        for rows in _chunks(n, chunk):
            shifted = logits[rows].to(dtype) - row_max[rows, None]
            sum_exp[rows] = shifted.exp().sum(dim=-1)
            target[rows] = shifted.gather(-1, local_ids[rows, None]).squeeze(-1)
        with _label("vocab_parallel_cross_entropy.target"):
            target = all_reduce(target * mine, group)
        with _label("vocab_parallel_cross_entropy.sum_exp"):
            log_sum_exp = all_reduce(sum_exp, group).log()
        ignored = labels == ignore_index
        ctx.save_for_backward(logits, labels, row_max + log_sum_exp)
        ctx.vocab_start, ctx.ignore_index, ctx.chunk = vocab_start, ignore_index, chunk
        return (log_sum_exp - target).masked_fill(ignored, 0.0).float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, labels, lse = ctx.saved_tensors
        mine, local_ids = _local_targets(labels, ctx.vocab_start, logits.shape[1])
        scale = grad_loss.to(lse.dtype).masked_fill(labels == ctx.ignore_index, 0.0)
        grad = torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], ctx.chunk):   # softmax - onehot(target), one chunk at a time
            probs = (logits[rows].to(lse.dtype) - lse[rows, None]).exp()
            probs.scatter_add_(-1, local_ids[rows, None], -mine[rows, None].to(probs.dtype))
            grad[rows] = (probs * scale[rows, None]).to(grad.dtype)
        return grad, None, None, None, None, None


def _local_targets(labels: Tensor, vocab_start: int, vocab_local: int) -> tuple[Tensor, Tensor]:
    """(whether this rank holds each label's logit, its index in the local slice, 0 if not held)."""
    mine = (labels >= vocab_start) & (labels < vocab_start + vocab_local)
    return mine, torch.where(mine, labels - vocab_start, torch.zeros_like(labels))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
