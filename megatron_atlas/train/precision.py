"""Numeric precision of a run: when the forward runs in bf16, and TF32 for fp32 maths on CUDA.

One rule for both engines: `train.precision=bf16`, or `auto` on CUDA, runs the forward under bf16
autocast while parameters, gradients and optimizer state stay fp32 (the native loop wraps its
forward in `autocast_for`; DeepSpeed gets the same autocast through its `torch_autocast` config).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch

AutocastFactory = Callable[[], ContextManager]


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether the forward runs under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str) -> AutocastFactory:
    """Parameters and optimizer state stay fp32; `bf16` runs the forward under autocast."""
    if uses_bf16(device, precision):
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def configure_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (`enabled`) or not.

    Process-wide switches, so only touched for CUDA runs: on CPU "high" would let oneDNN change
    the fp32 maths the CPU tests check bit for bit."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
