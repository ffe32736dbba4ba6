"""The memory function M_W(u) and the rank-one factors of its per-token inner-loss gradients.

`memory_apply` is written once against a `linear(name, x)` callback, so the token loop (a plain
matmul with W_t) and the chunked dual form (W_t expressed through chunk-start quantities) share the
same network definition.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from kernels.precision import flush_threshold

Linear = Callable[[str, torch.Tensor], torch.Tensor]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")


def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * gelu'(x) for the exact GELU, as one fused (and twice-differentiable) op."""
    return torch.ops.aten.gelu_backward(grad, x, approximate="none")


def memory_apply(kind: str, linear: Linear, u: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """M_W(u): linear `W u`; mlp `r + W1 gelu(W2 u)`; gated_mlp `r + W1 (gelu(W2 u) * W3 u)`."""
    if kind == "linear":
        return linear("W", u)
    hidden = gelu(linear("W2", u))
    if kind == "gated_mlp":
        hidden = hidden * linear("W3", u)
    return residual + linear("W1", hidden)


def matmul_linear(weights: Dict[str, torch.Tensor]) -> Linear:
    """The `linear` callback for explicit weights [B, H, out, in] and inputs [B, H, N, in]."""
    return lambda name, x: x @ weights[name].mT


def inner_loss(loss: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token inner loss [..., N]: l2 = 0.5 ||M - v||^2, dot = -<M, v>."""
    if loss == "l2":
        return 0.5 * (prediction - target).pow(2).sum(-1)
    return -(prediction * target).sum(-1)


def gradient_factors(kind: str, loss: str, weights: Dict[str, torch.Tensor], u: torch.Tensor,
                     residual: torch.Tensor, target: torch.Tensor
                     ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """For tokens u [B, H, N, D]: name -> (delta [B,H,N,out], x [B,H,N,in]) with grad_W l_i = delta_i x_i^T.

    All gradients are taken at `weights` (the chunk-start weights in the dual form).
    """
    def output_error(prediction: torch.Tensor) -> torch.Tensor:
        return prediction - target if loss == "l2" else -target

    if kind == "linear":
        return {"W": (output_error(u @ weights["W"].mT), u)}
    pre = u @ weights["W2"].mT
    act = gelu(pre)
    if kind == "gated_mlp":
        gate = u @ weights["W3"].mT
        hidden = act * gate
    else:
        hidden = act
    error = output_error(residual + hidden @ weights["W1"].mT)
    d_hidden = error @ weights["W1"]
    factors = {"W1": (error, hidden)}
    if kind == "gated_mlp":
        factors["W2"] = (gelu_backward(d_hidden * gate, pre), u)
        factors["W3"] = (d_hidden * act, u)
    else:
        factors["W2"] = (gelu_backward(d_hidden, pre), u)
    return factors


def normalised_momentum(momentum: torch.Tensor) -> torch.Tensor:
    """S sqrt(min(out, in)) / ||S||_F for S [..., out, in]: the Frobenius norm of an orthogonal matrix
    of full rank, which is what Newton-Schulz would make of S (muon_block's steps inside a block)."""
    rank = min(momentum.shape[-2:])
    norm = torch.linalg.matrix_norm(momentum, keepdim=True)
    return momentum * (rank ** 0.5 / norm.clamp_min(flush_threshold(momentum.dtype)))
