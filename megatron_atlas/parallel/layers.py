"""Tensor-parallel linear and embedding layers (Megatron style), over `ParallelState.tp_group`.

Parameters are created full-size with the usual nn.Linear / nn.Embedding initialisation and tagged
with their partition dim; `sharding.shard_parameters_` then keeps this rank's slice (the LM does it
at the end of its constructor; call it yourself on a layer built on its own). At tp=1 these layers
are plain nn.Linear / nn.Embedding with the same parameter names.

Entering a TP region: with sequence parallelism the input is a sequence shard and is all-gathered
(gradient reduce-scattered); without it the input is replicated (gradient all-reduced). Leaving:
row-parallel partial sums are reduce-scattered to sequence shards (SP) or all-reduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .collectives import (copy_to_tp_region, gather_from_sequence_region, gather_from_tp_region,
                          reduce_from_tp_region, reduce_scatter_to_sequence_region, scatter_to_tp_region)
from .sharding import divide, mark_sequence_parallel, mark_tensor_parallel, tp_size_of
from .state import ParallelState


def _tp_group(parallel: ParallelState | None):
    return None if parallel is None else parallel.tp_group


def _sp(parallel: ParallelState | None) -> bool:
    return parallel is not None and parallel.sequence_parallel and parallel.tp_size > 1


def enter_tp_region(x: Tensor, parallel: ParallelState | None) -> Tensor:
    """The full-sequence, replicated input of a TP region (one call per region, shared by its
    column-parallel layers)."""
    if _sp(parallel):
        return gather_from_sequence_region(x, parallel.tp_group)
    return copy_to_tp_region(x, _tp_group(parallel))


def exit_tp_region(y: Tensor, parallel: ParallelState | None) -> Tensor:
    """Sum the ranks' partial outputs: reduce-scatter to sequence shards (SP) or all-reduce."""
    if _sp(parallel):
        return reduce_scatter_to_sequence_region(y, parallel.tp_group)
    return reduce_from_tp_region(y, _tp_group(parallel))


class ColumnParallelLinear(nn.Linear):
    """y = x W^T + b with W split by output rows: rank r computes out_features/tp outputs.

    `input_in_region=True` means x already went through `enter_tp_region` (several layers share
    one entry); `gather_output=True` all-gathers the output features.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel: ParallelState | None = None, gather_output: bool = False,
                 input_in_region: bool = False, what: str = "out_features") -> None:
        super().__init__(in_features, out_features, bias=bias)
        divide(out_features, tp_size_of(parallel), what)
        self.parallel, self.gather_output, self.input_in_region = parallel, gather_output, input_in_region
        mark_tensor_parallel(self.weight, 0)
        if bias:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_in_region:
            x = enter_tp_region(x, self.parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, _tp_group(self.parallel)) if self.gather_output else y


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W split by input columns: rank r holds in_features/tp inputs, and the
    partial products are summed across ranks (reduce-scattered along the sequence under SP)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel: ParallelState | None = None, input_is_parallel: bool = True,
                 what: str = "in_features") -> None:
        super().__init__(in_features, out_features, bias=bias)
        divide(in_features, tp_size_of(parallel), what)
        self.parallel, self.input_is_parallel = parallel, input_is_parallel
        mark_tensor_parallel(self.weight, 1)
        if bias:  # added after the reduction: replicated, and on sequence shards under SP
            mark_sequence_parallel(self.bias, parallel)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, _tp_group(self.parallel))
        y = exit_tp_region(F.linear(x, self.weight), self.parallel)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding whose rows (token ids) are split in contiguous ranges across TP ranks; each rank
    looks up the ids it holds, zeros the rest, and `forward` all-reduces the results (full sequence,
    replicated output)."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 parallel: ParallelState | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim)
        divide(num_embeddings, tp_size_of(parallel), "vocab_size")
        self.parallel = parallel
        mark_tensor_parallel(self.weight, 0)

    def partial(self, ids: Tensor) -> Tensor:
        """This rank's term of the embedding: its rows for the ids it holds, zeros elsewhere. The
        sum over TP ranks is the embedding (reduce-scatter it to go straight to sequence shards)."""
        if tp_size_of(self.parallel) == 1:
            return F.embedding(ids, self.weight)
        rows = self.weight.shape[0]
        start = self.parallel.tp_rank * rows
        outside = (ids < start) | (ids >= start + rows)
        local = torch.where(outside, torch.zeros_like(ids), ids - start)
        return F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)

    def forward(self, ids: Tensor) -> Tensor:
        return reduce_from_tp_region(self.partial(ids), _tp_group(self.parallel))


def gather_logits(local_logits: Tensor, parallel: ParallelState | None) -> Tensor:
    """Full-vocabulary logits [..., V] from the vocab-parallel shards [..., V/tp] (for eval and
    generation; the gradient is split back)."""
    return gather_from_tp_region(local_logits, _tp_group(parallel))
