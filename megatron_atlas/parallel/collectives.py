"""Conjugate autograd collectives over an explicit process group (Megatron-Core "mappings" style).

Each region function pairs a forward collective with the collective its gradient needs:

    copy_to_tp_region               fwd identity          bwd all-reduce
    reduce_from_tp_region           fwd all-reduce        bwd identity
    scatter_to_tp_region            fwd split last dim    bwd all-gather last dim
    gather_from_tp_region           fwd all-gather last   bwd split last dim
    scatter_to_sequence_region      fwd split seq dim     bwd all-gather seq dim
    gather_from_sequence_region     fwd all-gather seq    bwd reduce-scatter seq (or split)
    reduce_scatter_to_sequence_region  fwd reduce-scatter seq   bwd all-gather seq
    all_to_all                      fwd all-to-all        bwd the reverse all-to-all

Every one is the identity when the group is None or has one member, so single-process code paths
run the same functions. Activations here are batch-first [B, T, ...], so the sequence dim is 1.

`record_comm()` collects (collective, bytes) for every collective actually issued; bytes is the
size of the full (unsharded) tensor the collective works on: the input of an all-reduce or a
reduce-scatter, the output of an all-gather, the input of an all-to-all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

Group = Optional[dist.ProcessGroup]
SEQ_DIM = 1
# torch >= 2.13 names the flat-tensor collectives *_single; older releases *_into_tensor / *_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CommRecord:
    op: str          # all_reduce | all_gather | reduce_scatter | all_to_all
    bytes: int
    label: str       # the region function (or caller) that issued it


_recorders: List[List[CommRecord]] = []
_labels: List[str] = []


@contextlib.contextmanager
def record_comm() -> Iterator[List[CommRecord]]:
    """Collect every collective issued inside the block (forward and backward) into a list."""
    records: List[CommRecord] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def _record(op: str, tensor: Tensor) -> None:
    if _recorders:
        entry = CommRecord(op, tensor.numel() * tensor.element_size(), _labels[-1] if _labels else op)
        for records in _recorders:
            records.append(entry)


@contextlib.contextmanager
def _label(name: str) -> Iterator[None]:
    _labels.append(name)
    try:
        yield
    finally:
        _labels.pop()


def group_size(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# ---- raw collectives (no autograd) -------------------------------------------------------------

def all_reduce(x: Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """Sum (or `op`) of x over the group, as a new tensor."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    _record("all_reduce", out)
    dist.all_reduce(out, op=op, group=group)
    return out


def split(x: Tensor, dim: int, group: Group) -> Tensor:
    """This rank's contiguous 1/size slice of x along dim (no communication)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} into {size} equal parts")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def all_gather(x: Tensor, dim: int, group: Group) -> Tensor:
    """Concatenation along dim of every rank's x, in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0],) + tuple(front.shape[1:]))
    _record("all_gather", out)
    _all_gather_flat(out, front, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: Tensor, dim: int, group: Group) -> Tensor:
    """Sum over ranks of x, of which this rank keeps its 1/size slice along dim."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // size,) + tuple(front.shape[1:]))
    _record("reduce_scatter", front)
    _reduce_scatter_flat(out, front, group=group)
    return out.movedim(0, dim)


def all_to_all_dims(x: Tensor, scatter_dim: int, gather_dim: int, group: Group) -> Tensor:
    """Split x along scatter_dim, send part r to rank r, concatenate what arrives along gather_dim."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[scatter_dim] % size:
        raise ValueError(f"cannot all-to-all: dim {scatter_dim} of size {x.shape[scatter_dim]} "
                         f"is not divisible by {size} ranks")
    parts = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()    # [size, ...] part r -> rank r
    out = torch.empty_like(parts)
    _record("all_to_all", parts)
    dist.all_to_all_single(out, parts, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


# ---- autograd region functions -----------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        with _label("copy_to_tp_region.bwd"):
            return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        with _label("reduce_from_tp_region.fwd"):
            return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ToShard(torch.autograd.Function):
    """Forward: this rank's slice along dim, of x itself (split) or of the sum over ranks
    (reduce-scatter). Backward: all-gather of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce, name):
        ctx.dim, ctx.group, ctx.name = dim, group, name
        if not reduce:
            return split(x, dim, group)
        with _label(f"{name}.fwd"):
            return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        with _label(f"{ctx.name}.bwd"):
            return all_gather(grad, ctx.dim, ctx.group), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad, name):
        ctx.dim, ctx.group, ctx.reduce_grad, ctx.name = dim, group, reduce_grad, name
        with _label(f"{name}.fwd"):
            return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            with _label(f"{ctx.name}.bwd"):
                return reduce_scatter(grad, ctx.dim, ctx.group), None, None, None, None
        return split(grad, ctx.dim, ctx.group), None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        with _label("all_to_all.fwd"):
            return all_to_all_dims(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        with _label("all_to_all.bwd"):
            return all_to_all_dims(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _single(group: Group) -> bool:
    return group_size(group) == 1


def copy_to_tp_region(x: Tensor, group: Group) -> Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient."""
    return x if _single(group) else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: Tensor, group: Group) -> Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if _single(group) else _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: Tensor, group: Group) -> Tensor:
    """Keep this rank's slice of the last (hidden) dim; the gradient is all-gathered."""
    return x if _single(group) else _ToShard.apply(x, -1, group, False, "scatter_to_tp_region")


def gather_from_tp_region(x: Tensor, group: Group) -> Tensor:
    """Concatenate the ranks' slices of the last dim; the gradient is split back."""
    return x if _single(group) else _Gather.apply(x, -1, group, False, "gather_from_tp_region")


def scatter_to_sequence_region(x: Tensor, group: Group, dim: int = SEQ_DIM) -> Tensor:
    """Keep this rank's slice of the sequence; the gradient is all-gathered."""
    return x if _single(group) else _ToShard.apply(x, dim, group, False, "scatter_to_sequence_region")


def gather_from_sequence_region(x: Tensor, group: Group, dim: int = SEQ_DIM,
                                reduce_grad: bool = True) -> Tensor:
    """All-gather the sequence shards. The gradient is reduce-scattered when the gathered tensor
    feeds rank-specific (tensor-parallel) computation, else (reduce_grad=False) split."""
    return x if _single(group) else _Gather.apply(x, dim, group, reduce_grad, "gather_from_sequence_region")


def reduce_scatter_to_sequence_region(x: Tensor, group: Group, dim: int = SEQ_DIM) -> Tensor:
    """Sum partial results and keep this rank's sequence slice; the gradient is all-gathered."""
    return x if _single(group) else _ToShard.apply(x, dim, group, True, "reduce_scatter_to_sequence_region")


def all_to_all(x: Tensor, group: Group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Autograd all-to-all: scatter `scatter_dim`, gather `gather_dim`; backward swaps them."""
    return x if _single(group) else _AllToAll.apply(x, scatter_dim, gather_dim, group)


def sequence_to_heads(x: Tensor, group: Group, seq_dim: int = SEQ_DIM, head_dim: int = 2) -> Tensor:
    """[B, T/cp, H, d] sequence shards -> [B, T, H/cp, d] head shards (context parallel)."""
    return all_to_all(x, group, scatter_dim=head_dim, gather_dim=seq_dim)


def heads_to_sequence(x: Tensor, group: Group, seq_dim: int = SEQ_DIM, head_dim: int = 2) -> Tensor:
    """[B, T, H/cp, d] head shards -> [B, T/cp, H, d] sequence shards (the inverse of the above)."""
    return all_to_all(x, group, scatter_dim=seq_dim, gather_dim=head_dim)
