"""Cross entropy over vocab-parallel logits without gathering the vocabulary."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import _label, all_reduce, reduce_from_tp_region
from .state import ParallelState


def vocab_parallel_cross_entropy(local_logits: Tensor, labels: Tensor, parallel: ParallelState | None,
                                 ignore_index: int = -100) -> Tensor:
    """Per-token loss [...] equal to F.cross_entropy(full_logits, labels, reduction="none").

    local_logits [..., V/tp] is this TP rank's contiguous vocab slice (rank r holds ids
    [r V/tp, (r+1) V/tp)). Three all-reduces of [...]-sized tensors: the max (no gradient), the
    target logit and the sum of exponentials; the backward needs no communication. Positions whose
    label is ignore_index get loss 0. Computed in float32.
    """
    group = None if parallel is None else parallel.tp_group
    rank = 0 if parallel is None else parallel.tp_rank
    logits = local_logits.float()
    vocab_local = logits.shape[-1]
    start = rank * vocab_local
    with torch.no_grad(), _label("vocab_parallel_cross_entropy.max"):
        # any per-row constant works for stability; the max keeps exp() <= 1
        row_max = all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
    shifted = logits - row_max.unsqueeze(-1)
    mine = (labels >= start) & (labels < start + vocab_local)
    local_ids = torch.where(mine, labels - start, torch.zeros_like(labels))
    target = shifted.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1) * mine
    target = reduce_from_tp_region(target, group)
    sum_exp = reduce_from_tp_region(shifted.exp().sum(dim=-1), group)
    loss = sum_exp.log() - target
    return loss.masked_fill(labels == ignore_index, 0.0)
