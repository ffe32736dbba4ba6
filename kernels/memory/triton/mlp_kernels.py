"""Triton kernels of the MLP memory `r + W1 gelu(W2 u)` with the `gd` rule: forward and backward.

One program owns one (batch*head) pair and walks the chunks in order (forward) or in reverse
(backward). The hidden units of an MLP interact through the output error, so unlike the linear
memory d_v cannot be split across programs; instead each chunk loops over blocks of BLOCK_H hidden
units, and the state W1 [d_v, d_h], W2 [d_h, D] (momentum S1, S2 alike) lives in a per-head global
buffer that stays in L2 across chunks. Per chunk (N = b + c - 1 window tokens, X the lifted window
keys, V the targets with the key residual already subtracted; every product over d_h is a sum over
blocks):

    P  = X W2^T,  A = gelu(P),  E = A W1^T - V (l2) | -V (dot)      key pass at the chunk-start W
    Z  = E W1,    G = Z * gelu'(P)                                   per-token factors of grad W2
    Hq = r * (Q W2^T) - cr * (Q S2^T) - (MIX * Q X^T) G              queries' first layer at W_t
    y  = r * (gelu(Hq) W1^T) - cr * (gelu(Hq) S1^T) - (MIX * gelu(Hq) A^T) E
    W1' = aE W1 - cE S1 - (mW*E)^T A,   S1' = pE S1 + (mS*E)^T A    (W2, S2 with G and X)

Gate coefficients come from PyTorch as for the linear kernel (`chunked.coefficients.gd_coefficients`, laid out by `common.gd_coefficients_flat`).
The forward writes the chunk-start state of every chunk into slot n of the state buffers (slot n+1
is the next chunk's start; without autograd two slots alternate); the backward reloads them and
recomputes each hidden block three times per chunk (for the sum over hidden units of the second
layer's kernel, for the error's gradient, and for the per-block weight gradients) rather than
storing [N, d_h] intermediates. A barrier ends every chunk: the next one reads state rows that
other threads of the program wrote.
"""
from __future__ import annotations

from kernels.triton_support import tl, triton

from .linear_kernels import chunk_inputs

@triton.jit
def _gelu_parts(x):
    """Exact (erf) GELU and its first and second derivatives."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))     # 1 / sqrt(2)
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327              # 1 / sqrt(2 pi)
    return x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)


@triton.jit
def _slot_bases(bh, slot, slots, DV, DH, D):
    """Offsets of one state slot in the [BH, slots, d_v, d_h] and [BH, slots, d_h, D] buffers."""
    index = bh * slots + slot
    return index * DV * DH, index * DH * D


@triton.jit
def _block_offsets(h0, DV, DH, D, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    v = tl.arange(0, BLOCK_V)
    h = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    first = v[:, None] * DH + h[None, :]
    second = h[:, None] * D + d[None, :]
    return (first, (v < DV)[:, None] & (h < DH)[None, :],
            second, (h < DH)[:, None] & (d < D)[None, :])


@triton.jit
def _load_block(W1, W2, S1, S2, base1, base2, h0, DV, DH, D, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Hidden units h0 .. h0+BLOCK_H of W1 [d_v, d_h], W2 [d_h, D] and of their momenta."""
    at1, ok1, at2, ok2 = _block_offsets(h0, DV, DH, D, BLOCK_V, BLOCK_H, BLOCK_D)
    return (tl.load(W1 + base1 + at1, mask=ok1, other=0.0), tl.load(W2 + base2 + at2, mask=ok2, other=0.0),
            tl.load(S1 + base1 + at1, mask=ok1, other=0.0), tl.load(S2 + base2 + at2, mask=ok2, other=0.0))


@triton.jit
def _store_block(W1, W2, S1, S2, base1, base2, h0, DV, DH, D, w1, w2, s1, s2,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    at1, ok1, at2, ok2 = _block_offsets(h0, DV, DH, D, BLOCK_V, BLOCK_H, BLOCK_D)
    tl.store(W1 + base1 + at1, w1, mask=ok1)
    tl.store(W2 + base2 + at2, w2, mask=ok2)
    tl.store(S1 + base1 + at1, s1, mask=ok1)
    tl.store(S2 + base2 + at2, s2, mask=ok2)


@triton.jit
def _key_error(x, val, W1, W2, base1, base2, DV, DH, D, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
               L2: tl.constexpr, PRECISION: tl.constexpr):
    """E = gelu(X W2^T) W1^T - V for l2 (summed over hidden blocks), -V for dot."""
    err = -val
    if L2:
        for h0 in range(0, DH, BLOCK_H):
            at1, ok1, at2, ok2 = _block_offsets(h0, DV, DH, D, BLOCK_V, BLOCK_H, BLOCK_D)
            w1 = tl.load(W1 + base1 + at1, mask=ok1, other=0.0)
            w2 = tl.load(W2 + base2 + at2, mask=ok2, other=0.0)
            act, _, _ = _gelu_parts(tl.dot(x, tl.trans(w2), input_precision=PRECISION))
            err += tl.dot(act, tl.trans(w1), input_precision=PRECISION)
    return err


@triton.jit
def _hidden_block(x, q, mk1, err, r, cr, w1, w2, s2, PRECISION: tl.constexpr):
    """Per hidden block: key pass (P, A, gelu'(P), gelu''(P)), factors Z, G, and the queries'
    first layer at W_t (Hq, gelu(Hq), gelu'(Hq)); also Q W2^T and Q S2^T for the gate gradients."""
    pre = tl.dot(x, tl.trans(w2), input_precision=PRECISION)                     # [N, H]
    act, d_act, dd_act = _gelu_parts(pre)
    z = tl.dot(err, w1, input_precision=PRECISION)                                # [N, H]
    factor = z * d_act
    q_w = tl.dot(q, tl.trans(w2), input_precision=PRECISION)                      # [b, H]
    q_s = tl.dot(q, tl.trans(s2), input_precision=PRECISION)
    hq = r[:, None] * q_w - cr[:, None] * q_s - tl.dot(mk1, factor, input_precision=PRECISION)
    act_q, d_act_q, _ = _gelu_parts(hq)
    return act, d_act, dd_act, z, factor, q_w, q_s, act_q, d_act_q


@triton.jit
def _block_backward(W1, W2, S1, S2, DW1, DW2, DS1, DS2, st1, st2, end1, end2, h0, DV, DH, D,
                    x, q, mk1, err, dy, d_k2, r, cr, mw, ms, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """What backward passes 2 and 3 both need of one hidden block: its chunk-start state and the
    gradient of its chunk-end state, the recomputed forward, and the gradients of Hq and of G."""
    w1, w2, s1, s2 = _load_block(W1, W2, S1, S2, st1, st2, h0, DV, DH, D, BLOCK_V, BLOCK_H, BLOCK_D)
    dw1, dw2, ds1, ds2 = _load_block(DW1, DW2, DS1, DS2, end1, end2, h0, DV, DH, D,
                                     BLOCK_V, BLOCK_H, BLOCK_D)
    act, d_act, dd_act, z, factor, q_w, q_s, act_q, d_act_q = _hidden_block(
        x, q, mk1, err, r, cr, w1, w2, s2, PRECISION)
    d_hq = d_act_q * (r[:, None] * tl.dot(dy, w1, input_precision=PRECISION)
                      - cr[:, None] * tl.dot(dy, s1, input_precision=PRECISION)
                      + tl.dot(d_k2, act, input_precision=PRECISION))
    x_dw2 = tl.dot(x, tl.trans(dw2), input_precision=PRECISION)      # [N, H]
    x_ds2 = tl.dot(x, tl.trans(ds2), input_precision=PRECISION)
    d_factor = (ms[:, None] * x_ds2 - mw[:, None] * x_dw2
                - tl.dot(tl.trans(mk1), d_hq, input_precision=PRECISION))
    return (w1, w2, s1, s2, dw1, dw2, ds1, ds2, act, d_act, dd_act, z, factor, q_w, q_s, act_q,
            x_dw2, x_ds2, d_hq, d_factor)


@triton.jit(do_not_specialize=["WIN"])
def mlp_gd_fwd(Q, X, V, MIX, R, CR, MW, MS, ENDS, W1, W2, S1, S2, Y,
               T_PAD, D, DV, DH, N_CHUNKS, WIN,
               CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, L2: tl.constexpr,
               SAVE: tl.constexpr, PRECISION: tl.constexpr):
    """State buffers W1, W2, S1, S2 have N_CHUNKS + 1 slots when SAVE (slot n: chunk n's start,
    slot N_CHUNKS: the final state), else 2 alternating slots; slot 0 holds the initial state."""
    bh = tl.program_id(0).to(tl.int64)
    if SAVE:
        slots = N_CHUNKS + 1
    else:
        slots = 2
    t = tl.arange(0, CHUNK)
    v = tl.arange(0, BLOCK_V)
    for chunk_index in range(N_CHUNKS):
        if SAVE:
            src = chunk_index
            dst = chunk_index + 1
        else:
            src = chunk_index % 2
            dst = (chunk_index + 1) % 2
        src1, src2 = _slot_bases(bh, src, slots, DV, DH, D)
        dst1, dst2 = _slot_bases(bh, dst, slots, DV, DH, D)
        x, val, q, mix, r, cr, mw, ms, a_end, c_end, p_end = chunk_inputs(
            Q, X, V, MIX, R, CR, MW, MS, ENDS, bh, chunk_index, T_PAD, D, DV, N_CHUNKS, WIN,
            CHUNK, BLOCK_N, BLOCK_D, BLOCK_V, 0)
        err = _key_error(x, val, W1, W2, src1, src2, DV, DH, D, BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_D,
                         L2, PRECISION)
        mk1 = mix * tl.dot(q, tl.trans(x), input_precision=PRECISION)
        err_t = tl.trans(err)
        y = tl.zeros((CHUNK, BLOCK_V), dtype=tl.float32)
        k2 = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        for h0 in range(0, DH, BLOCK_H):
            w1, w2, s1, s2 = _load_block(W1, W2, S1, S2, src1, src2, h0, DV, DH, D,
                                         BLOCK_V, BLOCK_H, BLOCK_D)
            act, d_act, dd_act, z, factor, q_w, q_s, act_q, d_act_q = _hidden_block(
                x, q, mk1, err, r, cr, w1, w2, s2, PRECISION)
            k2 += tl.dot(act_q, tl.trans(act), input_precision=PRECISION)
            y += (r[:, None] * tl.dot(act_q, tl.trans(w1), input_precision=PRECISION)
                  - cr[:, None] * tl.dot(act_q, tl.trans(s1), input_precision=PRECISION))
            _store_block(
                W1, W2, S1, S2, dst1, dst2, h0, DV, DH, D,
                a_end * w1 - c_end * s1 - tl.dot(err_t, mw[:, None] * act, input_precision=PRECISION),
                a_end * w2 - c_end * s2 - tl.dot(tl.trans(mw[:, None] * factor), x, input_precision=PRECISION),
                p_end * s1 + tl.dot(err_t, ms[:, None] * act, input_precision=PRECISION),
                p_end * s2 + tl.dot(tl.trans(ms[:, None] * factor), x, input_precision=PRECISION),
                BLOCK_V, BLOCK_H, BLOCK_D)
        y -= tl.dot(mix * k2, err, input_precision=PRECISION)
        tl.store(Y + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * DV + v[None, :], y,
                 mask=(v < DV)[None, :])
        tl.debug_barrier()


@triton.jit(do_not_specialize=["WIN"])
def mlp_gd_bwd(Q, X, V, MIX, R, CR, MW, MS, ENDS, W1, W2, S1, S2, DY,
               DW1, DW2, DS1, DS2, DQ, DX, DVAL, DMIX, DR, DCR, DMW, DMS, DENDS,
               T_PAD, D, DV, DH, N_CHUNKS, WIN,
               CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, L2: tl.constexpr,
               PRECISION: tl.constexpr):
    """Reverse walk over chunks. W1..S2: the forward's saved chunk-start states (N_CHUNKS + 1
    slots). DW1..DS2: two alternating slots of the gradient of the current chunk-end state; slot 0
    holds the final state's gradient on entry, slot N_CHUNKS % 2 the initial state's on exit.
    DX and DVAL are per chunk ([.., N_CHUNKS, N, .]); the caller folds the shared window rows."""
    bh = tl.program_id(0).to(tl.int64)
    n_win = CHUNK + WIN - 1
    t = tl.arange(0, CHUNK)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    v = tl.arange(0, BLOCK_V)
    n_ok, d_ok, v_ok = n < n_win, d < D, v < DV
    for step in range(N_CHUNKS):
        chunk_index = N_CHUNKS - 1 - step
        cb = bh * N_CHUNKS + chunk_index
        st1, st2 = _slot_bases(bh, chunk_index, N_CHUNKS + 1, DV, DH, D)
        end1, end2 = _slot_bases(bh, step % 2, 2, DV, DH, D)
        start1, start2 = _slot_bases(bh, (step + 1) % 2, 2, DV, DH, D)
        x, val, q, mix, r, cr, mw, ms, a_end, c_end, p_end = chunk_inputs(
            Q, X, V, MIX, R, CR, MW, MS, ENDS, bh, chunk_index, T_PAD, D, DV, N_CHUNKS, WIN,
            CHUNK, BLOCK_N, BLOCK_D, BLOCK_V, 0)
        dy = tl.load(DY + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * DV + v[None, :],
                     mask=v_ok[None, :], other=0.0)
        err = _key_error(x, val, W1, W2, st1, st2, DV, DH, D, BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_D,
                         L2, PRECISION)
        mk1 = mix * tl.dot(q, tl.trans(x), input_precision=PRECISION)
        # pass 1: the second layer's kernel gelu(Hq) A^T sums over every hidden block
        k2 = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        for h0 in range(0, DH, BLOCK_H):
            w1, w2, s1, s2 = _load_block(W1, W2, S1, S2, st1, st2, h0, DV, DH, D,
                                         BLOCK_V, BLOCK_H, BLOCK_D)
            act, d_act, dd_act, z, factor, q_w, q_s, act_q, d_act_q = _hidden_block(
                x, q, mk1, err, r, cr, w1, w2, s2, PRECISION)
            k2 += tl.dot(act_q, tl.trans(act), input_precision=PRECISION)
        dy_err = tl.dot(dy, tl.trans(err), input_precision=PRECISION)        # [b, N]
        d_k2 = -dy_err * mix
        d_err = -tl.dot(tl.trans(mix * k2), dy, input_precision=PRECISION)   # [N, V]
        mix_at = (cb * CHUNK + t[:, None]) * n_win + n[None, :]
        # MIX's gradient through the second layer now, through the first after pass 2: fewer
        # [b, N] tiles stay live across the hidden loops
        tl.store(DMIX + mix_at, -dy_err * k2, mask=n_ok[None, :])
        d_mk1 = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        dq = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
        dr = tl.zeros((CHUNK,), dtype=tl.float32)
        dcr = tl.zeros((CHUNK,), dtype=tl.float32)
        dmw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dms = tl.zeros((BLOCK_N,), dtype=tl.float32)
        d_ends = tl.zeros((4,), dtype=tl.float32)    # gradients of aE, cE, pE (and a pad lane)
        lane = tl.arange(0, 4)
        # pass 2: everything that sums over hidden blocks (the error's gradient, dQ, gate grads)
        for h0 in range(0, DH, BLOCK_H):
            (w1, w2, s1, s2, dw1, dw2, ds1, ds2, act, d_act, dd_act, z, factor, q_w, q_s, act_q,
             x_dw2, x_ds2, d_hq, d_factor) = _block_backward(
                W1, W2, S1, S2, DW1, DW2, DS1, DS2, st1, st2, end1, end2, h0, DV, DH, D,
                x, q, mk1, err, dy, d_k2, r, cr, mw, ms, BLOCK_V, BLOCK_H, BLOCK_D, PRECISION)
            a_dw1 = tl.dot(act, tl.trans(dw1), input_precision=PRECISION)    # [N, V]
            a_ds1 = tl.dot(act, tl.trans(ds1), input_precision=PRECISION)
            d_err += (tl.dot(d_factor * d_act, tl.trans(w1), input_precision=PRECISION)
                      + ms[:, None] * a_ds1 - mw[:, None] * a_dw1)
            d_mk1 -= tl.dot(d_hq, tl.trans(factor), input_precision=PRECISION)
            dq += (r[:, None] * tl.dot(d_hq, w2, input_precision=PRECISION)
                   - cr[:, None] * tl.dot(d_hq, s2, input_precision=PRECISION))
            dr += (tl.sum(dy * tl.dot(act_q, tl.trans(w1), input_precision=PRECISION), axis=1)
                   + tl.sum(d_hq * q_w, axis=1))
            dcr -= (tl.sum(dy * tl.dot(act_q, tl.trans(s1), input_precision=PRECISION), axis=1)
                    + tl.sum(d_hq * q_s, axis=1))
            dmw -= tl.sum(factor * x_dw2, axis=1) + tl.sum(err * a_dw1, axis=1)
            dms += tl.sum(factor * x_ds2, axis=1) + tl.sum(err * a_ds1, axis=1)
            grad_a = tl.sum(tl.sum(dw1 * w1, axis=1), axis=0) + tl.sum(tl.sum(dw2 * w2, axis=1), axis=0)
            grad_c = -tl.sum(tl.sum(dw1 * s1, axis=1), axis=0) - tl.sum(tl.sum(dw2 * s2, axis=1), axis=0)
            grad_p = tl.sum(tl.sum(ds1 * s1, axis=1), axis=0) + tl.sum(tl.sum(ds2 * s2, axis=1), axis=0)
            d_ends += tl.where(lane == 0, grad_a, tl.where(lane == 1, grad_c,
                                                           tl.where(lane == 2, grad_p, 0.0)))
        mix = tl.load(MIX + mix_at, mask=n_ok[None, :], other=0.0)
        d_k1 = d_mk1 * mix
        tl.debug_barrier()   # DMIX was written by other threads of this program
        d_mix = tl.load(DMIX + mix_at, mask=n_ok[None, :], other=0.0)
        tl.store(DMIX + mix_at, d_mix + d_mk1 * tl.dot(q, tl.trans(x), input_precision=PRECISION),
                 mask=n_ok[None, :])
        dq += tl.dot(d_k1, x, input_precision=PRECISION)
        dx = tl.dot(tl.trans(d_k1), q, input_precision=PRECISION)          # [N, D]
        tl.store(DQ + (bh * T_PAD + chunk_index * CHUNK + t[:, None]) * D + d[None, :], dq,
                 mask=d_ok[None, :])
        tl.store(DR + cb * CHUNK + t, dr)
        tl.store(DCR + cb * CHUNK + t, dcr)
        tl.store(DMW + cb * n_win + n, dmw, mask=n_ok)
        tl.store(DMS + cb * n_win + n, dms, mask=n_ok)
        tl.store(DENDS + cb * 3 + lane, d_ends, mask=lane < 3)
        tl.store(DVAL + (cb * n_win + n[:, None]) * DV + v[None, :], -d_err,
                 mask=n_ok[:, None] & v_ok[None, :])
        # pass 3: per-block gradients of the keys' activations and of the chunk-start state
        for h0 in range(0, DH, BLOCK_H):
            (w1, w2, s1, s2, dw1, dw2, ds1, ds2, act, d_act, dd_act, z, factor, q_w, q_s, act_q,
             x_dw2, x_ds2, d_hq, d_factor) = _block_backward(
                W1, W2, S1, S2, DW1, DW2, DS1, DS2, st1, st2, end1, end2, h0, DV, DH, D,
                x, q, mk1, err, dy, d_k2, r, cr, mw, ms, BLOCK_V, BLOCK_H, BLOCK_D, PRECISION)
            d_z = d_factor * d_act
            d_act_k = (tl.dot(tl.trans(d_k2), act_q, input_precision=PRECISION)
                       + ms[:, None] * tl.dot(err, ds1, input_precision=PRECISION)
                       - mw[:, None] * tl.dot(err, dw1, input_precision=PRECISION))
            if L2:
                d_act_k += tl.dot(d_err, w1, input_precision=PRECISION)
            d_pre = d_act_k * d_act + d_factor * z * dd_act                   # [N, H]
            dx += (tl.dot(d_pre, w2, input_precision=PRECISION)
                   + ms[:, None] * tl.dot(factor, ds2, input_precision=PRECISION)
                   - mw[:, None] * tl.dot(factor, dw2, input_precision=PRECISION))
            dw1_start = (a_end * dw1
                         + tl.dot(tl.trans(dy), r[:, None] * act_q, input_precision=PRECISION)
                         + tl.dot(tl.trans(err), d_z, input_precision=PRECISION))
            if L2:
                dw1_start += tl.dot(tl.trans(d_err), act, input_precision=PRECISION)
            _store_block(
                DW1, DW2, DS1, DS2, start1, start2, h0, DV, DH, D,
                dw1_start,
                a_end * dw2 + tl.dot(tl.trans(d_pre), x, input_precision=PRECISION)
                + tl.dot(tl.trans(r[:, None] * d_hq), q, input_precision=PRECISION),
                p_end * ds1 - c_end * dw1
                - tl.dot(tl.trans(dy), cr[:, None] * act_q, input_precision=PRECISION),
                p_end * ds2 - c_end * dw2
                - tl.dot(tl.trans(cr[:, None] * d_hq), q, input_precision=PRECISION),
                BLOCK_V, BLOCK_H, BLOCK_D)
        tl.store(DX + (cb * n_win + n[:, None]) * D + d[None, :], dx,
                 mask=n_ok[:, None] & d_ok[None, :])
        tl.debug_barrier()
