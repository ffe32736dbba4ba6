"""Causal depthwise convolution over time as shifted multiply-adds, with a hand-written backward.

y[t] = sum_j taps[j] * p[t + j] over the sequence p = [cache; x] (width w, w-1 cached tokens).
On [B, T, C] channels-last inputs this is w passes over x in each direction, with no transposed
copies; PyTorch's depthwise conv1d (channels-first) costs several times more on CPU, its backward
most of all.
"""
from __future__ import annotations

import torch
from torch import Tensor

_DOT_BLOCK = 256   # time steps per block of the per-channel dot products (temporaries stay in cache)


def _channel_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum over batch and time of a * b for [B, L, C] tensors -> [C]."""
    out = a.new_zeros(a.shape[-1])
    for start in range(0, a.shape[1], _DOT_BLOCK):
        block = slice(start, start + _DOT_BLOCK)
        out += (a[:, block] * b[:, block]).sum((0, 1))
    return out


def _shifted(length: int, shift: int) -> int:
    """How many leading outputs read the cache for a tap `shift` tokens back (the rest read x)."""
    return min(shift, length)


class CausalDepthwiseConv(torch.autograd.Function):
    """apply(x [B, T, C], cache [B, w-1, C], taps [w, C]) -> y [B, T, C]."""

    @staticmethod
    def forward(ctx, x: Tensor, cache: Tensor, taps: Tensor) -> Tensor:
        width, length = taps.shape[0], x.shape[1]
        y = x * taps[width - 1]
        for j in range(width - 1):
            shift = width - 1 - j   # tap j reads the token `shift` steps back
            head = _shifted(length, shift)
            y[:, :head].addcmul_(cache[:, j:j + head], taps[j])
            if length > shift:
                y[:, shift:].addcmul_(x[:, :length - shift], taps[j])
        ctx.save_for_backward(x, cache, taps)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, cache, taps = ctx.saved_tensors
        width, length = taps.shape[0], x.shape[1]
        dx = dy * taps[width - 1]
        dcache = torch.zeros_like(cache)
        dtaps = torch.empty_like(taps)
        dtaps[width - 1] = _channel_dots(dy, x)
        for j in range(width - 1):
            shift = width - 1 - j
            head = _shifted(length, shift)
            dcache[:, j:j + head].addcmul_(dy[:, :head], taps[j])
            dtaps[j] = _channel_dots(dy[:, :head], cache[:, j:j + head])
            if length > shift:
                dx[:, :length - shift].addcmul_(dy[:, shift:], taps[j])
                dtaps[j] += _channel_dots(dy[:, shift:], x[:, :length - shift])
        return dx, dcache, dtaps


def causal_depthwise_conv(x: Tensor, cache: Tensor, taps: Tensor) -> Tensor:
    """y[t] = sum_j taps[j] * [cache; x][t + j] for x [B, T, C], cache [B, w-1, C], taps [w, C]."""
    return CausalDepthwiseConv.apply(x, cache, taps)
