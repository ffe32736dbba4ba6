"""Which parameters are split across TP ranks, and how to cut or join them.

Convention (read by the reshard/consolidation tool and by DeepSpeed's grad-norm through the mpu):
a TP-sharded parameter carries `tensor_model_parallel = True` and `partition_dim = d`, and the
TP ranks' shards concatenated along `d` in tp_rank order are exactly the TP=1 parameter. Replicated
parameters carry no such attribute. A replicated parameter that sees only a sequence shard under
sequence parallelism also carries `sequence_parallel = True` (its gradient needs a TP all-reduce,
see grads.reduce_sequence_parallel_grads).

Modules create their parameters full-size with the single-process initialisation and tag them;
`shard_parameters_` then keeps this rank's slice, so one seed gives the same full weights at any TP.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .state import ParallelConfigError, ParallelState


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    return param


def mark_sequence_parallel(param: nn.Parameter, parallel: ParallelState | None) -> nn.Parameter:
    """Tag a replicated parameter that is applied to sequence shards (only when SP is on)."""
    if parallel is not None and parallel.sequence_parallel and parallel.tp_size > 1:
        param.sequence_parallel = True
    return param


def is_tensor_parallel(param: Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def tp_size_of(parallel: ParallelState | None) -> int:
    return 1 if parallel is None else parallel.tp_size


def divide(total: int, parts: int, what: str) -> int:
    """total / parts, or ParallelConfigError naming the numbers."""
    if total % parts:
        raise ParallelConfigError(f"{what}={total} is not divisible by tensor-parallel size tp={parts}")
    return total // parts


def shard_parameters_(module: nn.Module, parallel: ParallelState | None) -> nn.Module:
    """Replace every tagged full-size parameter by this rank's slice, in place (idempotent).

    The Parameter objects are kept, so tied weights stay tied and attributes stay attached.
    """
    size = tp_size_of(parallel)
    if size == 1:
        return module
    for name, param in module.named_parameters():
        if not is_tensor_parallel(param) or getattr(param, "tp_sharded", False):
            continue
        dim = param.partition_dim
        divide(param.shape[dim], size, f"dim {dim} of parameter {name}")
        with torch.no_grad():
            param.data = param.data.chunk(size, dim=dim)[parallel.tp_rank].clone()
        param.tp_sharded = True
    return module


def partition_dims(model: nn.Module) -> Dict[str, int]:
    """{state_dict key: partition_dim} of every TP-sharded parameter (tied names included).

    Independent of the TP degree: build the model on the meta device to get it from a config,
    `with torch.device("meta"): partition_dims(build_model(cfg))`.
    """
    return {name: p.partition_dim for name, p in model.named_parameters(remove_duplicate=False)
            if is_tensor_parallel(p)}


def _dims(model_or_dims: Union[nn.Module, Mapping[str, int]]) -> Mapping[str, int]:
    return partition_dims(model_or_dims) if isinstance(model_or_dims, nn.Module) else model_or_dims


def shard_state_dict(full_sd: Mapping[str, Tensor], model_or_dims: Union[nn.Module, Mapping[str, int]],
                     tp_rank: int, tp_size: int) -> Dict[str, Tensor]:
    """The state dict of TP rank `tp_rank` of `tp_size`, cut from a TP-free (full) state dict."""
    dims = _dims(model_or_dims)
    out = {}
    for key, value in full_sd.items():
        if key in dims:
            divide(value.shape[dims[key]], tp_size, f"dim {dims[key]} of {key}")
            value = value.chunk(tp_size, dim=dims[key])[tp_rank].clone()
        out[key] = value
    return out


def gather_state_dict(shard_sds: Sequence[Mapping[str, Tensor]],
                      model_or_dims: Union[nn.Module, Mapping[str, int]]) -> Dict[str, Tensor]:
    """Join the state dicts of all TP ranks (in tp_rank order) into one TP-free state dict.

    Replicated entries are taken from rank 0.
    """
    dims = _dims(model_or_dims)
    first = shard_sds[0]
    return {key: torch.cat([sd[key] for sd in shard_sds], dim=dims[key]) if key in dims else value
            for key, value in first.items()}
