"""The gradient fix-up sequence parallelism needs, for every engine and ZeRO stage.

A parameter tagged `sequence_parallel` (d_model norm weights, persistent tokens, a row-parallel
bias) is replicated over the TP group but applied to this rank's sequence shard only, so each TP
rank's gradient is its part of the sum over the sequence. `reduce_sequence_parallel_grads`
registers on each such parameter a gradient hook that sums it over the TP group as backward
produces it, before it is accumulated into `.grad`.

Why in backward, per parameter, and not one coalesced all-reduce after backward: DeepSpeed's
ZeRO-2/3 move every gradient into their reduction buckets during backward (and ZeRO-1 at the
accumulation boundary's backward), so after `engine.backward()` there is no `.grad` left to fix,
and the global grad norm DeepSpeed then computes must already see the summed gradients. The hooks
issue one small all-reduce per such parameter and micro-batch: ((L N + 1) d + n_persist d)
elements in total (docs/parallelism.md).
"""
from __future__ import annotations

import functools

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .collectives import Group, _label, all_reduce
from .state import ParallelState


def reduce_sequence_parallel_grads(model: nn.Module, parallel: ParallelState | None) -> list[RemovableHandle]:
    """Make the gradients of `model`'s `sequence_parallel` parameters sums over the TP group (a
    no-op without sequence parallelism). Call once, before the first backward (and before
    `deepspeed.initialize`); returns the hook handles."""
    if parallel is None or not parallel.sequence_parallel or parallel.tp_size == 1:
        return []
    return [p.register_hook(functools.partial(_summed_over_tp, group=parallel.tp_group))
            for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def _summed_over_tp(grad: Tensor, group: Group) -> Tensor:
    with _label("sequence_parallel_grads"):
        return all_reduce(grad, group)
