"""Triton kernels of the linear memory with the `gd` rule: the chunk recurrence, forward and backward.

One program owns one (batch*head, block of d_v rows) pair and walks the chunks in order (forward)
or in reverse (backward), keeping the state rows W, S [BLOCK_V, BLOCK_D] (and in backward their
gradients) in registers; rows of a linear memory never interact, so d_v tiles with no
communication. Per chunk (N = b + c - 1 window tokens, X the lifted window keys):

    E   = X W_s^T - V  (l2)  or  -V  (dot)                                 [N, V]
    y   = r * (Q W_s^T) - cr * (Q S_s^T) - (MIX * Q X^T) E                 [b, V]
    W'  = aE W_s - cE S_s - (mW * E)^T X,    S' = pE S_s + (mS * E)^T X

The gate coefficients (MIX, r, cr, mW, mS, aE, cE, pE) come precomputed from PyTorch
(`chunked.coefficients.gd_coefficients`, laid out by `common.gd_coefficients_flat`); the backward returns their gradients and autograd carries
them to the gates. Quantities that sum over d_v (gradients of Q, X and of the coefficients) are
written per v-block and summed by the caller; window rows shared by two chunks are written per
chunk and folded by the caller.
"""
from __future__ import annotations

from kernels.triton_support import tl, triton


@triton.jit
def chunk_inputs(Q, X, V, MIX, R, CR, MW, MS, ENDS, bh, chunk_index, T_PAD, D, DV, N_CHUNKS, WIN,
                  CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, v_block):
    """Loads one chunk's window keys, values, queries and gate coefficients (fp32)."""
    n_win = CHUNK + WIN - 1
    t = tl.arange(0, CHUNK)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    v = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok, d_ok, v_ok = n < n_win, d < D, v < DV
    rows = chunk_index * CHUNK + n          # window coordinates: always < T_PAD + WIN - 1
    t_win = T_PAD + WIN - 1
    x = tl.load(X + (bh * t_win + rows[:, None]) * D + d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    val = tl.load(V + (bh * t_win + rows[:, None]) * DV + v[None, :],
                  mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    q = tl.load(Q + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * D + d[None, :],
                mask=d_ok[None, :], other=0.0).to(tl.float32)
    cb = bh * N_CHUNKS + chunk_index
    mix = tl.load(MIX + (cb * CHUNK + t[:, None]) * n_win + n[None, :], mask=n_ok[None, :], other=0.0)
    r = tl.load(R + cb * CHUNK + t)
    cr = tl.load(CR + cb * CHUNK + t)
    mw = tl.load(MW + cb * n_win + n, mask=n_ok, other=0.0)
    ms = tl.load(MS + cb * n_win + n, mask=n_ok, other=0.0)
    a_end = tl.load(ENDS + cb * 3)
    c_end = tl.load(ENDS + cb * 3 + 1)
    p_end = tl.load(ENDS + cb * 3 + 2)
    return x, val, q, mix, r, cr, mw, ms, a_end, c_end, p_end


@triton.jit(do_not_specialize=["WIN"])
def linear_gd_fwd(Q, X, V, MIX, R, CR, MW, MS, ENDS, W0, S0, Y, WS, SS, WF, SF,
                  T_PAD, D, DV, N_CHUNKS, WIN,
                  CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, L2: tl.constexpr,
                  SAVE: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    v_block = tl.program_id(1)
    t = tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    v = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < DV
    state_mask = v_ok[:, None] & (d < D)[None, :]
    state_at = v[:, None] * D + d[None, :]
    w = tl.load(W0 + bh * DV * D + state_at, mask=state_mask, other=0.0)
    s = tl.load(S0 + bh * DV * D + state_at, mask=state_mask, other=0.0)
    for chunk_index in range(N_CHUNKS):
        if SAVE:  # chunk-start state: all the backward needs besides the inputs
            saved = (bh * N_CHUNKS + chunk_index) * DV * D + state_at
            tl.store(WS + saved, w, mask=state_mask)
            tl.store(SS + saved, s, mask=state_mask)
        x, val, q, mix, r, cr, mw, ms, a_end, c_end, p_end = chunk_inputs(
            Q, X, V, MIX, R, CR, MW, MS, ENDS, bh, chunk_index, T_PAD, D, DV, N_CHUNKS, WIN,
            CHUNK, BLOCK_N, BLOCK_D, BLOCK_V, v_block)
        if L2:
            err = tl.dot(x, tl.trans(w), input_precision=PRECISION) - val
        else:
            err = -val
        kernel = tl.dot(q, tl.trans(x), input_precision=PRECISION) * mix
        y = (r[:, None] * tl.dot(q, tl.trans(w), input_precision=PRECISION)
             - cr[:, None] * tl.dot(q, tl.trans(s), input_precision=PRECISION)
             - tl.dot(kernel, err, input_precision=PRECISION))
        tl.store(Y + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * DV + v[None, :], y,
                 mask=v_ok[None, :])
        w_next = (a_end * w - c_end * s
                  - tl.dot(tl.trans(mw[:, None] * err), x, input_precision=PRECISION))
        s = p_end * s + tl.dot(tl.trans(ms[:, None] * err), x, input_precision=PRECISION)
        w = w_next
    tl.store(WF + bh * DV * D + state_at, w, mask=state_mask)
    tl.store(SF + bh * DV * D + state_at, s, mask=state_mask)


@triton.jit(do_not_specialize=["WIN"])
def linear_gd_bwd(Q, X, V, MIX, R, CR, MW, MS, ENDS, WS, SS, DY, DWF, DSF,
                  DQ, DX, DVAL, DMIX, DR, DCR, DMW, DMS, DENDS, DW0, DS0,
                  T_PAD, D, DV, N_CHUNKS, BH, WIN,
                  CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, L2: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Reverse walk over chunks; dW, dS (gradients of the chunk-end state) stay in registers.

    Outputs with a leading v-block index (DQ, DX, DMIX, DR, DCR, DMW, DMS, DENDS) are partial
    sums over this program's d_v rows; DX and DVAL are per chunk ([.., N_CHUNKS, N, .]).
    """
    bh = tl.program_id(0).to(tl.int64)
    v_block = tl.program_id(1)
    part = v_block * BH + bh                # index of this program's partial sums
    n_win = CHUNK + WIN - 1
    t = tl.arange(0, CHUNK)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    v = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok, d_ok, v_ok = n < n_win, d < D, v < DV
    state_mask = v_ok[:, None] & d_ok[None, :]
    state_at = v[:, None] * D + d[None, :]
    dw = tl.load(DWF + bh * DV * D + state_at, mask=state_mask, other=0.0)
    ds = tl.load(DSF + bh * DV * D + state_at, mask=state_mask, other=0.0)
    for step in range(N_CHUNKS):
        chunk_index = N_CHUNKS - 1 - step
        cb = bh * N_CHUNKS + chunk_index
        saved = cb * DV * D + state_at
        w = tl.load(WS + saved, mask=state_mask, other=0.0)
        s = tl.load(SS + saved, mask=state_mask, other=0.0)
        x, val, q, mix, r, cr, mw, ms, a_end, c_end, p_end = chunk_inputs(
            Q, X, V, MIX, R, CR, MW, MS, ENDS, bh, chunk_index, T_PAD, D, DV, N_CHUNKS, WIN,
            CHUNK, BLOCK_N, BLOCK_D, BLOCK_V, v_block)
        dy = tl.load(DY + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * DV + v[None, :],
                     mask=v_ok[None, :], other=0.0)
        if L2:
            err = tl.dot(x, tl.trans(w), input_precision=PRECISION) - val
        else:
            err = -val
        qx = tl.dot(q, tl.trans(x), input_precision=PRECISION)            # [b, N]
        x_dw = tl.dot(x, tl.trans(dw), input_precision=PRECISION)         # [N, V]
        x_ds = tl.dot(x, tl.trans(ds), input_precision=PRECISION)
        d_err = (ms[:, None] * x_ds - mw[:, None] * x_dw
                 - tl.dot(tl.trans(mix * qx), dy, input_precision=PRECISION))
        d_kernel = -tl.dot(dy, tl.trans(err), input_precision=PRECISION)  # d(MIX * QX^T)
        d_qx = d_kernel * mix
        # gate-coefficient gradients (partial over this v-block)
        cb_part = part * N_CHUNKS + chunk_index
        tl.store(DMIX + (cb_part * CHUNK + t[:, None]) * n_win + n[None, :], d_kernel * qx,
                 mask=n_ok[None, :])
        tl.store(DR + cb_part * CHUNK + t,
                 tl.sum(dy * tl.dot(q, tl.trans(w), input_precision=PRECISION), axis=1))
        tl.store(DCR + cb_part * CHUNK + t,
                 -tl.sum(dy * tl.dot(q, tl.trans(s), input_precision=PRECISION), axis=1))
        tl.store(DMW + cb_part * n_win + n, -tl.sum(err * x_dw, axis=1), mask=n_ok)
        tl.store(DMS + cb_part * n_win + n, tl.sum(err * x_ds, axis=1), mask=n_ok)
        tl.store(DENDS + cb_part * 3, tl.sum(tl.sum(dw * w, axis=1), axis=0))
        tl.store(DENDS + cb_part * 3 + 1, -tl.sum(tl.sum(dw * s, axis=1), axis=0))
        tl.store(DENDS + cb_part * 3 + 2, tl.sum(tl.sum(ds * s, axis=1), axis=0))
        # input gradients
        dq = (r[:, None] * tl.dot(dy, w, input_precision=PRECISION)
              - cr[:, None] * tl.dot(dy, s, input_precision=PRECISION)
              + tl.dot(d_qx, x, input_precision=PRECISION))
        tl.store(DQ + ((part * T_PAD) + chunk_index * CHUNK + t[:, None]) * D + d[None, :], dq,
                 mask=d_ok[None, :])
        dx = (tl.dot(tl.trans(d_qx), q, input_precision=PRECISION)
              + tl.dot(ms[:, None] * err, ds, input_precision=PRECISION)
              - tl.dot(mw[:, None] * err, dw, input_precision=PRECISION))
        if L2:
            dx += tl.dot(d_err, w, input_precision=PRECISION)
        tl.store(DX + (cb_part * n_win + n[:, None]) * D + d[None, :], dx,
                 mask=n_ok[:, None] & d_ok[None, :])
        tl.store(DVAL + (cb * n_win + n[:, None]) * DV + v[None, :], -d_err,
                 mask=n_ok[:, None] & v_ok[None, :])
        # gradients of the chunk-start state, carried to the previous chunk
        dw_prev = (tl.dot(tl.trans(r[:, None] * dy), q, input_precision=PRECISION) + a_end * dw)
        if L2:
            dw_prev += tl.dot(tl.trans(d_err), x, input_precision=PRECISION)
        ds = (p_end * ds - c_end * dw
              - tl.dot(tl.trans(cr[:, None] * dy), q, input_precision=PRECISION))
        dw = dw_prev
    tl.store(DW0 + bh * DV * D + state_at, dw, mask=state_mask)
    tl.store(DS0 + bh * DV * D + state_at, ds, mask=state_mask)
