"""Triton Newton-Schulz: one program per matrix, the whole iteration in registers, fp32 throughout.

Same signature and result as `reference.newton_schulz`. Gradients: the forward runs the kernel and
the backward recomputes the PyTorch reference under autograd (NS is a few small matmuls per matrix,
so a recompute costs about one more forward).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.precision import backward_without_autocast
from kernels.triton_support import HAS_TRITON, LaunchConfig, device_reason, next_pow2, tl, triton

from .reference import _NORM_FLOOR, NS_COEFFICIENTS
from .reference import newton_schulz as newton_schulz_reference

# X [m, n] and the Gram matrices [m, m] live in registers: an sm_90 compile of m = n = 128 spills
# ~10 KB per thread at any warp count, m = 64, n = 128 with 16 warps spills nothing.
MAX_SHORT, MAX_WIDE = 64, 128

if HAS_TRITON:
    @triton.jit
    def newton_schulz_kernel(X, Y, ROWS, COLS, STEPS, A, B, C, FLOOR,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """X, Y: [batch, ROWS, COLS] fp32 with ROWS <= COLS (the caller transposes tall matrices).
        Zero padding is exact: padded rows and columns stay zero through every step."""
        pid = tl.program_id(0).to(tl.int64)
        m = tl.arange(0, BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        mask = (m < ROWS)[:, None] & (n < COLS)[None, :]
        at = pid * ROWS * COLS + m[:, None] * COLS + n[None, :]
        x = tl.load(X + at, mask=mask, other=0.0)
        norm = tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0))
        x = x / tl.maximum(norm, FLOOR)
        for _ in range(STEPS):
            gram = tl.dot(x, tl.trans(x), input_precision="ieee")
            poly = B * gram + C * tl.dot(gram, gram, input_precision="ieee")
            x = A * x + tl.dot(poly, x, input_precision="ieee")
        tl.store(Y + at, x, mask=mask)
else:  # pragma: no cover
    newton_schulz_kernel = None


def unsupported_reason(matrix: torch.Tensor) -> Optional[str]:
    """None when the Triton kernel covers `matrix` ([..., m, n]); else why not."""
    device = device_reason(newton_schulz_kernel, matrix)
    if device is not None:
        return device
    if matrix.dim() < 2:
        return "a vector (NS passes vectors unchanged)"
    if matrix.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {matrix.dtype}"
    if min(matrix.shape[-2:]) > MAX_SHORT or max(matrix.shape[-2:]) > MAX_WIDE:
        return (f"matrix shape {tuple(matrix.shape[-2:])} (Triton covers a short side <= {MAX_SHORT} "
                f"and a wide side <= {MAX_WIDE})")
    return None


def launch_config(short: int, wide: int) -> LaunchConfig:
    """The compiled variant for matrices whose short side is `short` and wide side `wide`."""
    block_m, block_n = next_pow2(short), next_pow2(wide)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    signature = {"X": "*fp32", "Y": "*fp32", "ROWS": "i32", "COLS": "i32", "STEPS": "i32",
                 "A": "fp32", "B": "fp32", "C": "fp32", "FLOOR": "fp32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    # 16 warps for 64 x 64 and up: the fewest spills in an sm_90 sweep of 8 and 16 warps
    warps = 4 if block_m * block_n <= 1024 else 8 if block_m * block_n <= 2048 else 16
    return LaunchConfig(f"newton_schulz M={block_m} N={block_n}", newton_schulz_kernel, signature,
                        constexprs, warps)


def all_launch_configs():
    return [launch_config(m, n) for n in (16, 32, 64, 128) for m in (16, 32, 64) if m <= n]


def _run_kernel(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    x = matrix.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    rows, cols = x.shape[-2:]
    flat = x.reshape(-1, rows, cols).contiguous()
    out = torch.empty_like(flat)
    config = launch_config(rows, cols)
    if flat.shape[0] > 0:
        newton_schulz_kernel[(flat.shape[0],)](flat, out, rows, cols, steps, *NS_COEFFICIENTS,
                                               _NORM_FLOOR, **config.constexprs,
                                               num_warps=config.num_warps)
    out = out.view(x.shape)
    return (out.mT if tall else out).to(matrix.dtype)


class _NewtonSchulz(torch.autograd.Function):
    @staticmethod
    def forward(ctx, matrix, steps):
        ctx.steps = steps
        ctx.save_for_backward(matrix)
        return _run_kernel(matrix, steps)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad):
        (matrix,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = matrix.detach().requires_grad_()
            out = newton_schulz_reference(leaf, ctx.steps)
            (d_matrix,) = torch.autograd.grad(out, leaf, grad)
        return d_matrix, None


def newton_schulz_triton(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonalise each matrix in `matrix` ([..., m, n]) with the Triton kernel; 1-D passes unchanged."""
    if matrix.dim() < 2:
        return matrix
    reason = unsupported_reason(matrix)
    if reason is not None:
        raise ValueError(f"Triton Newton-Schulz does not cover {reason}")
    return _NewtonSchulz.apply(matrix, steps)


def newton_schulz_auto(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Triton on CUDA where covered, else the PyTorch reference (never the CPU interpreter)."""
    if matrix.is_cuda and unsupported_reason(matrix) is None:
        return _NewtonSchulz.apply(matrix, steps)
    return newton_schulz_reference(matrix, steps)
