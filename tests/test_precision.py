"""train.precision and train.tf32: when the forward runs under bf16 autocast, and the TF32 switches,
which are set for CUDA runs only."""
from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_atlas.train.precision import autocast_for, configure_tf32, uses_bf16


def test_bf16_on_request_or_by_default_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_bf16(cpu, p) for p in ("auto", "fp32", "bf16")] == [False, False, True]
    assert [uses_bf16(cuda, p) for p in ("auto", "fp32", "bf16")] == [True, False, True]
    assert autocast_for(cpu, "auto") is contextlib.nullcontext
    with autocast_for(cpu, "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.fixture
def tf32_flags():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def _flags() -> tuple:
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def test_tf32_is_switched_for_cuda_devices_only(tf32_flags):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_tf32(torch.device("cpu"), True)   # process-wide: a CPU run must not change them
    assert _flags() == ("highest", False, False)
    configure_tf32(torch.device("cuda", 0), True)   # the switches are set without a GPU present
    assert _flags() == ("high", True, True)
    configure_tf32(torch.device("cuda", 0), False)
    assert _flags() == ("highest", False, False)
