"""Gradient fix-up the training loop runs after backward under sequence parallelism."""
from __future__ import annotations

from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .collectives import _label, all_reduce
from .state import ParallelState


def allreduce_sequence_parallel_grads(model: nn.Module, parallel: ParallelState | None) -> None:
    """Sum over the TP group the gradients of parameters tagged `sequence_parallel` (norm weights
    applied to sequence shards): each TP rank holds the part from its own tokens. One coalesced
    all-reduce; a no-op without sequence parallelism. Call after backward, before clipping/step."""
    if parallel is None or not parallel.sequence_parallel or parallel.tp_size == 1:
        return
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    with _label("allreduce_sequence_parallel_grads"):
        flat = all_reduce(_flatten_dense_tensors(grads), parallel.tp_group)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)
