"""Small layers against direct PyTorch formulations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_atlas.model.layers import RMSNorm, ShortConv


def test_short_conv_equals_causal_conv1d_and_streams():
    torch.manual_seed(0)
    conv = ShortConv(channels=6, width=4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, groups=6).transpose(1, 2)
    y, _ = conv(x)
    torch.testing.assert_close(y, expected)
    cache, pieces = None, []
    for part in x.split([5, 1, 1, 4], dim=1):       # streaming with the cache gives the same
        out, cache = conv(part, cache)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected)


def test_short_conv_gradients():
    """The hand-written backward against autograd's, for x, the cached tokens and the taps, including
    inputs shorter than the cache."""
    from megatron_atlas.model.causal_conv import causal_depthwise_conv
    gen = torch.Generator().manual_seed(0)
    for length in (1, 2, 11):
        x = torch.randn(2, length, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        cache = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        taps = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(causal_depthwise_conv, (x, cache, taps))
        expected = F.conv1d(torch.cat([cache, x], dim=1).transpose(1, 2), taps.t().unsqueeze(1),
                            groups=5).transpose(1, 2)
        torch.testing.assert_close(causal_depthwise_conv(x, cache, taps), expected)


def test_grouped_rms_norm_normalises_each_head():
    norm = RMSNorm(8, eps=0.0, groups=2)
    x = torch.randn(3, 8) * torch.tensor([1.0] * 4 + [100.0] * 4)
    y = norm(x).view(3, 2, 4)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 2))
