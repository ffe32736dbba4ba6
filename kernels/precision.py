"""The kernels' numerics, decided by the kernels rather than by the caller's settings.

Autocast is off inside the memory operator and Newton-Schulz (forward and backward): autocast would
run their matmuls in 16 bits (gate products, state updates and NS are meant for fp32), and its
in-place and `out=` ops, which autocast does not cast, would then mix dtypes.

Subnormal floats are kept out: products of many gates below 1, and states that decay over long
sequences, fall below the smallest normal number, where x86 arithmetic is many times slower on some
processors; such a value carries no information next to the O(1) terms it joins. Values below
`flush_threshold` = sqrt(smallest normal) are built as exact zeros (the square root keeps the
product of any two kept values normal too); the CPU recurrence runs on worker threads that flush
subnormal results in hardware (memory/chunked/cpu_threads.py); gradients leaving the operator are
flushed (memory/inputs.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Optional, TypeVar

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")   # others (meta: FLOP counting) have no autocast to turn off
Fn = TypeVar("Fn", bound=Callable)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The caller's autocast dtype on `device`, or None when autocast is off there."""
    if device.type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_off(device: torch.device) -> ContextManager:
    """A context in which `device` runs every op in the dtypes it is given."""
    if device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def backward_without_autocast(backward: Fn) -> Fn:
    """For an autograd Function's backward(ctx, *grads): a backward called inside an autocast region
    (CPU autograd runs it on the caller's thread) must not have its matmuls rounded either."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device for g in grads if isinstance(g, torch.Tensor)), torch.device("cpu"))
        with autocast_off(device):
            return backward(ctx, *grads)
    return wrapped  # type: ignore[return-value]


def flush_threshold(dtype: torch.dtype) -> float:
    """Magnitudes below this are built as exact zeros: sqrt(finfo.tiny) (fp32 and bf16: 1.1e-19)."""
    return math.sqrt(torch.finfo(dtype).tiny)


def flush_tiny(x: torch.Tensor) -> torch.Tensor:
    """x with |x| < flush_threshold set to exact zero (out of place, so autograd may go through)."""
    return torch.where(x.abs() < flush_threshold(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device), x)


def exp_flushed(log_x: torch.Tensor) -> torch.Tensor:
    """exp(log_x), exactly 0 where it would fall below flush_threshold (no subnormal result)."""
    floor = math.log(flush_threshold(log_x.dtype))
    return log_x.masked_fill(log_x < floor, -math.inf).exp()


def flush_gradient(x: torch.Tensor) -> torch.Tensor:
    """x itself, with its gradient flushed by `flush_tiny` on the way back (a no-op without grad)."""
    if x.requires_grad:
        x.register_hook(flush_tiny)
    return x
