"""The `gd` rule's recurrence over chunks as one autograd Function with a hand-derived backward.

Only the chunk-start state crosses a chunk boundary, so the forward walks the chunks once and keeps
each chunk's start state and a few activations; the backward walks them in reverse, carrying the
gradient of the state. Autograd sees one node instead of a graph of many small ops per chunk, and
gradients accumulate in place. Everything that does not depend on the state (features, gate
coefficients, the first layer's kernel) is computed for all chunks at once outside (gd.py),
where autograd differentiates it. Reads and updates of one weight matrix: gd_state_ops.py.

Per chunk (tensors [BH, rows, width]; b query rows, N = b + c - 1 window rows), with read() and
update() as in gd_state_ops and K the mixing-weighted first-layer kernel:
    linear: E = U_k W^T - target (l2) or -target (dot);   y = read(U_q; W, K, E)
    mlp:    Z = U_k W2^T, H = gelu(Z), E = H W1^T - target (or -target), D = gelu'(Z) * (E W1)
            Z_q = read(U_q; W2, K, D),  H_q = gelu(Z_q),  y = read(H_q; W1, MIX * H_q H^T, E)
    W' = update(W; E, U_k) (linear);  W2' = update(W2; D, U_k), W1' = update(W1; E, H) (mlp).
The residual of an mlp memory is outside (in target and in y).
"""
from __future__ import annotations

import math
from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from kernels.precision import backward_without_autocast

from ..memory_function import gelu
from .cpu_threads import row_groups, run_all
from .gd_state_ops import halves, read, read_backward, update, update_backward

Tensor = torch.Tensor
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_HALF_LOG2_E = 0.5 / math.log(2.0)


class GdSpec(NamedTuple):
    mlp: bool   # mlp memory (hidden layer W1 over the first layer W2); else linear (W only)
    l2: bool    # l2 inner loss: E = prediction - target; dot: E = -target


def _gelu_slope(z: Tensor, ones: Tensor) -> Tensor:
    """gelu'(z) as gelu_backward(1, z), the fused kernel (it needs a full-size grad)."""
    return torch.ops.aten.gelu_backward(ones[:, :z.shape[1]], z, approximate="none")


def _gelu_curvature(z: Tensor) -> Tensor:
    """gelu''(z) = pdf(z) (2 - z^2); exp2, as exp is several times slower on some CPU builds."""
    square = z.square()
    return torch.exp2(square * -_HALF_LOG2_E).mul_(_INV_SQRT_2PI).mul_(2.0 - square)


def _error(prediction: Optional[Tensor], target: Tensor) -> Tensor:
    return target.neg() if prediction is None else prediction.sub_(target)


class _Chunk(NamedTuple):
    """One chunk's slices of the per-chunk inputs (mixing is None for linear)."""

    uq: Tensor
    uk: Tensor
    target: Tensor
    kernel: Tensor
    ends: Tensor
    read_coef: Tensor
    update_coef: Tensor
    mixing: Optional[Tensor]


class _Saved(NamedTuple):
    """What the backward of one chunk needs beside its inputs (mlp fields are None for linear)."""

    ws_first: Tensor
    error: Tensor
    read_first: Optional[List[Tensor]]
    ws_hidden: Optional[Tensor] = None
    read_hidden: Optional[List[Tensor]] = None
    z: Optional[Tensor] = None          # first-layer pre-activation of the window tokens
    hidden: Optional[Tensor] = None     # gelu(z)
    slope: Optional[Tensor] = None      # gelu'(z)
    back: Optional[Tensor] = None       # E W1; the first layer's delta is slope * back
    hidden_q: Optional[Tensor] = None   # gelu of the queries' pre-activation
    slope_q: Optional[Tensor] = None
    kernel_h: Optional[Tensor] = None   # hidden_q hidden^T


Anchors = Tuple[Optional[Tensor], ...]   # W0 of each layer under anchored retention (else None)


def _linear_chunk(spec: GdSpec, c: _Chunk, ws: Tensor, ones: None, anchors: Anchors) -> Tuple[Tensor, Tuple, _Saved]:
    error = _error(torch.bmm(c.uk, halves(ws)[0].mT) if spec.l2 else None, c.target)
    y, read_first = read(c.uq, ws, c.read_coef, c.kernel, error, anchors[0])
    return y, (update(ws, error, c.uk, c.update_coef, c.ends, anchors[0]),), _Saved(ws, error, read_first)


def _mlp_chunk(spec: GdSpec, c: _Chunk, ws_first: Tensor, ws_hidden: Tensor, ones: Tensor, anchors: Anchors
               ) -> Tuple[Tensor, Tuple, _Saved]:
    w2, w1 = halves(ws_first)[0], halves(ws_hidden)[0]
    z = torch.bmm(c.uk, w2.mT)
    hidden, slope = gelu(z), _gelu_slope(z, ones)
    error = _error(torch.bmm(hidden, w1.mT) if spec.l2 else None, c.target)
    back = torch.bmm(error, w1)
    delta = back * slope
    z_q, read_first = read(c.uq, ws_first, c.read_coef, c.kernel, delta, anchors[0])
    hidden_q, slope_q = gelu(z_q), _gelu_slope(z_q, ones)
    kernel_h = torch.bmm(hidden_q, hidden.mT)
    y, read_hidden = read(hidden_q, ws_hidden, c.read_coef, c.mixing * kernel_h, error, anchors[1])
    states = (update(ws_first, delta, c.uk, c.update_coef, c.ends, anchors[0]),
              update(ws_hidden, error, hidden, c.update_coef, c.ends, anchors[1]))
    saved = _Saved(ws_first, error, read_first, ws_hidden, read_hidden, z, hidden, slope, back,
                   hidden_q, slope_q, kernel_h)
    return y, states, saved


def _rows(chunk: _Chunk, rows: slice) -> _Chunk:
    return _Chunk(*(x if x is None else x[:, rows] for x in chunk))


def _forward_rows(spec: GdSpec, inputs: _Chunk, states: Tuple[Tensor, ...], ys: Tensor, anchors: Anchors
                  ) -> Tuple[Tuple[Tensor, ...], List[_Saved]]:
    """The chunk loop for one group of (batch, head) rows: writes ys, returns the final states and
    what each chunk's backward needs."""
    ones = inputs.uk.new_ones(inputs.uk.shape[1], inputs.uk.shape[2], states[0].shape[1]) if spec.mlp else None
    step = _mlp_chunk if spec.mlp else _linear_chunk
    saved: List[_Saved] = []
    for n in range(inputs.uq.shape[0]):
        ys[n], states, chunk_saved = step(spec, _Chunk(*(x if x is None else x[n] for x in inputs)),
                                          *states, ones, anchors)
        saved.append(chunk_saved)
    return states, saved


def _backward_rows(spec: GdSpec, steps: List[_Saved], inputs: _Chunk, dy: Tensor,
                   carried: List[Tensor], grads: _Chunk, anchors: Anchors) -> Tuple[List[Tensor], List]:
    """The reverse chunk loop for one group of rows: writes grads, returns the start states' and
    the anchors' gradients."""
    carried = [g.contiguous() for g in carried]
    danchors = [None if a is None else torch.zeros_like(a) for a in anchors]
    # two buffers per state gradient, written in turn (the one read is the other), and scratch
    buffers = [[torch.empty_like(g) for _ in range(3)] for g in carried]
    step = _mlp_chunk_backward if spec.mlp else _linear_chunk_backward
    for n in range(inputs.uq.shape[0] - 1, -1, -1):
        out = [b[n % 2] for b in buffers]
        chunk_grads = step(spec, steps[n], _Chunk(*(x if x is None else x[n] for x in inputs)),
                           dy[n], carried, out, [b[2] for b in buffers], anchors, danchors)
        for grad, value in zip(grads, chunk_grads):
            if grad is not None:
                grad[n] = value
        carried = out
    return carried, danchors


def _flatten(saved: _Saved) -> List[Tensor]:
    """The tensors of one chunk's _Saved, in field order (lists inlined, None fields left out)."""
    out: List[Tensor] = []
    for value in saved:
        if isinstance(value, list):
            out.extend(value)
        elif value is not None:
            out.append(value)
    return out


def _layout(saved: _Saved) -> Tuple[Optional[int], ...]:
    """Per field: None (absent), 0 (one tensor) or n (a list of n); the same for every chunk."""
    return tuple(None if v is None else len(v) if isinstance(v, list) else 0 for v in saved)


def _unflatten(tensors: Sequence[Tensor], layout: Tuple[Optional[int], ...]) -> _Saved:
    fields, at = [], 0
    for size in layout:
        if size is None:
            fields.append(None)
        elif size == 0:
            fields.append(tensors[at])
            at += 1
        else:
            fields.append(list(tensors[at:at + size]))
            at += size
    return _Saved(*fields)


def _anchor_rows(anchors: Anchors, rows: slice) -> Anchors:
    return tuple(None if a is None else a[rows] for a in anchors)


class GdRecurrence(torch.autograd.Function):
    """forward(spec, uq, uk, target, kernel, ends, read_coef, update_coef, mixing, ws_first,
    ws_hidden) -> (y, final ws_first, final ws_hidden).

    Per-chunk inputs are [NC, BH, rows, width]: uq the query features [b, D], uk the window
    features [N, D], target [N, d_v], kernel [b, N], ends [NC, BH, 3] = (A, -F, P) of the chunk
    end, read_coef [b, m] = (r, -c) (m = 2 with momentum, else (r,)), update_coef [N, 2] =
    (-ew, es), and for mlp the mixing matrix [b, N]. States are [W | S] [BH, out, 2*in]. With
    anchored retention anchor_first / anchor_hidden are W0 [BH, out, in] of each layer: reads gain
    (1 - r) x W0^T and chunk-end weights (1 - A) W0 (gd_state_ops).
    On CPU the (batch, head) rows are split into one group per thread (cpu_threads.py).

    Everything the backward needs (each chunk's start state and activations) goes through
    save_for_backward, so saved-tensor hooks see it: activation checkpointing frees and
    recomputes it, and CPU offloading moves it.
    """

    @staticmethod
    def forward(ctx, spec: GdSpec, uq: Tensor, uk: Tensor, target: Tensor, kernel: Tensor,
                ends: Tensor, read_coef: Tensor, update_coef: Tensor, mixing: Optional[Tensor],
                ws_first: Tensor, ws_hidden: Optional[Tensor], anchor_first: Optional[Tensor] = None,
                anchor_hidden: Optional[Tensor] = None):
        inputs = _Chunk(uq, uk, target, kernel, ends, read_coef, update_coef, mixing)
        ys = uq.new_empty(*uq.shape[:3], target.shape[-1])
        states = (ws_first, ws_hidden) if spec.mlp else (ws_first,)
        anchors = (anchor_first, anchor_hidden)
        groups = row_groups(ws_first.shape[0], ws_first.device)
        results = run_all([partial(_forward_rows, spec, _rows(inputs, rows), tuple(x[rows] for x in states),
                                   ys[:, rows], _anchor_rows(anchors, rows)) for rows in groups], uq.device)
        per_chunk = [saved for _, group_saved in results for saved in group_saved]
        ctx.spec, ctx.groups, ctx.chunks = spec, groups, uq.shape[0]
        ctx.layout = _layout(per_chunk[0]) if per_chunk else ()
        ctx.anchored = (anchor_first is not None, anchor_hidden is not None)
        ctx.save_for_backward(*inputs, *(a for a in anchors if a is not None),
                              *(t for saved in per_chunk for t in _flatten(saved)))
        final = [torch.cat(parts) if len(parts) > 1 else parts[0]
                 for parts in zip(*(states for states, _ in results))]
        return ys, final[0], final[1] if spec.mlp else None

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, dy: Tensor, dws_first: Tensor, dws_hidden: Optional[Tensor]):
        spec, tensors = ctx.spec, ctx.saved_tensors
        inputs = _Chunk(*tensors[:len(_Chunk._fields)])
        rest = iter(tensors[len(_Chunk._fields):len(_Chunk._fields) + sum(ctx.anchored)])
        anchors = tuple(next(rest) if present else None for present in ctx.anchored)
        width = sum(1 if size == 0 else size or 0 for size in ctx.layout)
        flat = tensors[len(_Chunk._fields) + sum(ctx.anchored):]
        per_chunk = [_unflatten(flat[i * width:(i + 1) * width], ctx.layout)
                     for i in range(len(flat) // max(width, 1))]
        grads = _Chunk(*(x if x is None else torch.empty_like(x) for x in inputs))
        carried = (dws_first, dws_hidden) if spec.mlp else (dws_first,)
        results = run_all([partial(_backward_rows, spec, per_chunk[g * ctx.chunks:(g + 1) * ctx.chunks],
                                   _rows(inputs, rows), dy[:, rows], [g_[rows] for g_ in carried],
                                   _rows(grads, rows), _anchor_rows(anchors, rows))
                           for g, rows in enumerate(ctx.groups)], dy.device)
        join = lambda parts: torch.cat(parts) if len(parts) > 1 else parts[0]  # noqa: E731
        start = [join(parts) for parts in zip(*(states for states, _ in results))]
        danchors = [None if a is None else join(parts) for a, parts in zip(anchors, zip(*(d for _, d in results)))]
        return (None, *grads, start[0], start[1] if spec.mlp else None, *danchors)


def _linear_chunk_backward(spec: GdSpec, s: _Saved, c: _Chunk, dy: Tensor, carried, out, scratch,
                           anchors: Anchors, danchors) -> _Chunk:
    ws, dws = s.ws_first, out[0]
    derror, duk, dupdate_coef, dends = update_backward(carried[0], ws, s.error, c.uk, c.update_coef,
                                                       c.ends, dws, scratch[0], anchors[0], danchors[0])
    duq, dread_coef, dkernel = read_backward(dy, c.uq, ws, c.read_coef, c.kernel, s.error,
                                             s.read_first, dws, derror, anchors[0], danchors[0])
    if spec.l2:
        halves(dws)[0].baddbmm_(derror.mT, c.uk)
        duk.baddbmm_(derror, halves(ws)[0])
    return _Chunk(duq, duk, derror.neg(), dkernel, dends, dread_coef, dupdate_coef, None)


def _mlp_chunk_backward(spec: GdSpec, s: _Saved, c: _Chunk, dy: Tensor, carried, out, scratch,
                        anchors: Anchors, danchors) -> _Chunk:
    dws_first, dws_hidden = out
    w2, w1 = halves(s.ws_first)[0], halves(s.ws_hidden)[0]
    delta = s.back * s.slope
    # chunk-end updates
    derror, dhidden, dupdate_coef, dends = update_backward(
        carried[1], s.ws_hidden, s.error, s.hidden, c.update_coef, c.ends, dws_hidden, scratch[1], anchors[1],
        danchors[1])
    ddelta, duk, dupdate_coef_first, dends_first = update_backward(
        carried[0], s.ws_first, delta, c.uk, c.update_coef, c.ends, dws_first, scratch[0], anchors[0], danchors[0])
    # hidden layer read
    dhidden_q, dread_coef, dkernel_h = read_backward(
        dy, s.hidden_q, s.ws_hidden, c.read_coef, c.mixing * s.kernel_h, s.error, s.read_hidden,
        dws_hidden, derror, anchors[1], danchors[1])
    dmixing = dkernel_h * s.kernel_h
    dkernel_h.mul_(c.mixing)
    dhidden_q.baddbmm_(dkernel_h, s.hidden)
    dhidden.baddbmm_(dkernel_h.mT, s.hidden_q)
    # first layer read
    duq, dread_coef_first, dkernel = read_backward(
        dhidden_q.mul_(s.slope_q), c.uq, s.ws_first, c.read_coef, c.kernel, delta, s.read_first,
        dws_first, ddelta, anchors[0], danchors[0])
    # the gradient factors at the chunk-start weights
    dz = ddelta * s.back
    dz.mul_(_gelu_curvature(s.z))
    dback = ddelta.mul_(s.slope)
    derror.baddbmm_(dback, w1.mT)
    halves(dws_hidden)[0].baddbmm_(s.error.mT, dback)
    if spec.l2:
        halves(dws_hidden)[0].baddbmm_(derror.mT, s.hidden)
        dhidden.baddbmm_(derror, w1)
    dz.addcmul_(dhidden, s.slope)
    halves(dws_first)[0].baddbmm_(dz.mT, c.uk)
    duk.baddbmm_(dz, w2)
    return _Chunk(duq, duk, derror.neg(), dkernel, dends.add_(dends_first),
                  dread_coef.add_(dread_coef_first), dupdate_coef.add_(dupdate_coef_first), dmixing)
