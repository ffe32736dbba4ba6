"""Reads and chunk-end updates of one weight matrix under the `gd` rule, with their backward.

State layout: a weight matrix is carried beside its momentum as one tensor [W | S] [BH, out, 2*in].
Per chunk (rows: b query tokens, N window tokens):

    read:    out_t = r_t W_s x_t - c_t S_s x_t - sum_j kernel[t, j] delta_j
    update:  W' = A W_s - F S_s - sum_j ew_j delta_j x_j^T,   S' = P S_s + sum_j es_j delta_j x_j^T

The per-row coefficients (r, -c) and (-ew, es) scale whichever side of the matmul is narrower:
the inputs as one pair [r x | -c x] against [W | S] (one matmul), or the outputs of one matmul per
half. Without momentum the read coefficients are (r,) and only the W half is read. `ends` holds
(A, -F, P) per batch row. Backward functions accumulate into the state gradient `dws` and the delta
gradient in place; other gradients come back fresh.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

Tensor = torch.Tensor


def pair(x: Tensor, coef: Tensor) -> Tensor:
    """[coef_0 * x | coef_1 * x | ...] for x [.., L, F], coef [.., L, m] -> [.., L, m*F]."""
    return (coef.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def pair_backward(grad: Tensor, x: Tensor, coef: Tensor) -> Tuple[Tensor, Tensor]:
    parts = grad.unflatten(-1, (coef.shape[-1], x.shape[-1]))
    dx = parts[..., 0, :] * coef[..., 0:1]
    for m in range(1, coef.shape[-1]):
        dx.addcmul_(parts[..., m, :], coef[..., m:m + 1])
    return dx, (parts * x.unsqueeze(-2)).sum(-1)


def halves(ws: Tensor) -> Tuple[Tensor, Tensor]:
    """The W and S views of [W | S]."""
    half = ws.shape[-1] // 2
    return ws[..., :half], ws[..., half:]


def _scale_inputs(x: Tensor, out_width: int) -> bool:
    return x.shape[-1] <= out_width


def _row_dots(a: Tensor, parts: List[Tensor]) -> Tensor:
    """[.., L, len(parts)]: the row-wise dot products of a with each part."""
    return torch.stack([torch.linalg.vecdot(a, p) for p in parts], dim=-1)


def _scaled_sum(parts: List[Tensor], coef: Tensor) -> Tensor:
    out = parts[0] * coef[..., 0:1]
    for m in range(1, len(parts)):
        out.addcmul_(parts[m], coef[..., m:m + 1])
    return out


def read(x: Tensor, ws: Tensor, coef: Tensor, kernel: Tensor, delta: Tensor, anchor: Optional[Tensor] = None
         ) -> Tuple[Tensor, Optional[List[Tensor]]]:
    """(out, what read_backward needs: the unscaled products when the outputs were scaled).
    With an anchor W0 (anchored retention) the read also gets (1 - r_t) x W0^T."""
    count = coef.shape[-1]
    if _scale_inputs(x, ws.shape[1]):
        out, parts = torch.bmm(pair(x, coef), ws[..., :count * x.shape[-1]].mT), None
    else:
        parts = [torch.bmm(x, w.mT) for w in halves(ws)[:count]]
        out = _scaled_sum(parts, coef)
    if anchor is not None:
        out.baddbmm_(x * (1.0 - coef[..., :1]), anchor.mT)
    return out.baddbmm_(kernel, delta, alpha=-1.0), parts


def read_backward(grad: Tensor, x: Tensor, ws: Tensor, coef: Tensor, kernel: Tensor, delta: Tensor,
                  parts: Optional[List[Tensor]], dws: Tensor, ddelta: Tensor, anchor: Optional[Tensor] = None,
                  danchor: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(d x, d coef, d kernel); accumulates into dws and ddelta (and danchor with an anchor)."""
    count = coef.shape[-1]
    if parts is None:
        width = count * x.shape[-1]
        dws[..., :width].baddbmm_(grad.mT, pair(x, coef))
        dx, dcoef = pair_backward(torch.bmm(grad, ws[..., :width]), x, coef)
    else:
        dcoef, dx = _row_dots(grad, parts), None
        for m, (w, dw) in enumerate(zip(halves(ws)[:count], halves(dws))):
            scaled = grad * coef[..., m:m + 1]
            dw.baddbmm_(scaled.mT, x)
            dx = torch.bmm(scaled, w) if dx is None else dx.baddbmm_(scaled, w)
    ddelta.baddbmm_(kernel.mT, grad, alpha=-1.0)
    if anchor is not None:   # out += (1 - r) x W0^T
        keep = 1.0 - coef[..., :1]
        back = torch.bmm(grad, anchor)
        dx.addcmul_(back, keep)
        dcoef[..., 0].sub_((back * x).sum(-1))
        danchor.baddbmm_((grad * keep).mT, x)
    return dx, dcoef, torch.bmm(grad, delta.mT).neg_()


def update(ws: Tensor, delta: Tensor, x: Tensor, coef: Tensor, ends: Tensor, anchor: Optional[Tensor] = None
           ) -> Tensor:
    """The chunk-end state [A W - F S - delta^T (ew x) | P S + delta^T (es x)], a fresh tensor
    (+ (1 - A) W0 in the W half with an anchor)."""
    new = torch.empty_like(ws)
    if _scale_inputs(x, delta.shape[-1]):
        torch.bmm(delta.mT, pair(x, coef), out=new)
    else:
        for m, half in enumerate(halves(new)):
            torch.bmm((delta * coef[..., m:m + 1]).mT, x, out=half)
    (w, s), (new_w, new_s), scale = halves(ws), halves(new), ends[:, :, None, None]
    new_w.addcmul_(w, scale[:, 0]).addcmul_(s, scale[:, 1])
    if anchor is not None:
        new_w.addcmul_(anchor, 1.0 - scale[:, 0])
    new_s.addcmul_(s, scale[:, 2])
    return new


def update_backward(grad: Tensor, ws: Tensor, delta: Tensor, x: Tensor, coef: Tensor, ends: Tensor,
                    dws: Tensor, scratch: Tensor, anchor: Optional[Tensor] = None, danchor: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Writes d(start state) into dws; returns (d delta, d x, d coef, d ends); accumulates danchor.

    dws and scratch are reused buffers: a fresh state-sized tensor per chunk costs its page faults.
    """
    (gw, gs), (_, s), (dw, ds) = halves(grad), halves(ws), halves(dws)
    scale = ends[:, :, None, None]
    torch.mul(gw, scale[:, 0], out=dw)
    torch.mul(gs, scale[:, 2], out=ds).addcmul_(gw, scale[:, 1])
    rows = ws.shape[0], ws.shape[1], 2, ws.shape[2] // 2
    # <gW, W> and <gS, S> from one product of the whole tensors, <gW, S> from the halves
    diagonal = torch.mul(grad, ws, out=scratch).view(rows).sum((1, 3))
    across = torch.mul(gw, s, out=halves(scratch)[0]).sum((1, 2))
    dends = torch.stack([diagonal[:, 0], across, diagonal[:, 1]], dim=-1)
    if anchor is not None:   # W' += (1 - A) W0
        danchor.addcmul_(gw, 1.0 - scale[:, 0])
        dends[:, 0].sub_((gw * anchor).sum((1, 2)))
    if _scale_inputs(x, delta.shape[-1]):
        dx, dcoef = pair_backward(torch.bmm(delta, grad), x, coef)
        return torch.bmm(pair(x, coef), grad.mT), dx, dcoef, dends
    products = [torch.bmm(x, g.mT) for g in (gw, gs)]
    dx = None
    for m, g in enumerate((gw, gs)):
        scaled = delta * coef[..., m:m + 1]
        dx = torch.bmm(scaled, g) if dx is None else dx.baddbmm_(scaled, g)
    return _scaled_sum(products, coef), dx, _row_dots(delta, products), dends
