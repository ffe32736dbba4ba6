"""Causal (sliding-window) self-attention with optional sink tokens, and its decoding cache.

Visibility rule shared by every backend and by the cache: query t sees key s iff
    s <= t  and  (window is None  or  t - s < window  or  s < n_sink).
The first n_sink positions are "sinks" that stay visible to every later query.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_atlas.model.rope import apply_rope
from megatron_atlas.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region
from megatron_atlas.parallel.sharding import divide, tp_size_of
from megatron_atlas.parallel.state import ParallelState

try:  # flash-attn is an optional CUDA-only dependency
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None

BACKENDS = ("auto", "flash", "sdpa", "blockwise")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")


def visibility_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, n_sink: int = 0) -> Tensor:
    """Boolean [Tq, Tk] mask, True where query position q_pos[i] may attend key position k_pos[j]."""
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    if window is not None:
        visible &= (diff < window) | (k_pos[None, :] < n_sink)
    return visible


FLASH_MAX_HEAD_DIM = 256        # flash-attn 2 kernels exist for head_dim <= 256
FLASH_MIN_CAPABILITY = (8, 0)   # flash-attn 2 needs Ampere or newer (sm80+)


def flash_unsupported(head_dim: int, dtype: torch.dtype, n_sink: int,
                      capability: tuple[int, int] | None) -> str | None:
    """Why flash-attn cannot run this attention (None: it can). `capability` is the CUDA device's
    compute capability (None: not a CUDA tensor)."""
    if flash_attn_func is None:
        return "flash_attn is not installed"
    if capability is None:
        return "flash-attn needs a CUDA tensor"
    if capability < FLASH_MIN_CAPABILITY:
        return f"flash-attn 2 needs compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16/bf16, got {dtype}"
    if head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head_dim <= {FLASH_MAX_HEAD_DIM}, got {head_dim}"
    if n_sink:
        return f"flash-attn has no sink tokens (n_sink={n_sink})"
    return None


def _flash_reason(q: Tensor, n_sink: int) -> str | None:
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    return flash_unsupported(q.shape[-1], q.dtype, n_sink, capability)


def flash_applicable(q: Tensor, n_sink: int) -> bool:
    """flash-attn runs q [B, T, H, D] with these sinks (see `flash_unsupported` for the limits)."""
    return _flash_reason(q, n_sink) is None


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
    # flash-attn takes [B, T, H, D] and GQA natively; window_size=(left, right) counts the keys
    # each query may see besides itself, so `window` keys in total means left = window - 1.
    window_size = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5,
                           causal=True, window_size=window_size)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                     window: int | None, n_sink: int = 0) -> Tensor:
    """SDPA with an explicit visibility mask built from absolute positions (O(Tq * Tk) memory).

    q [B, Tq, H, D], k/v [B, Tk, Hkv, D]; used for short sequences and for decoding, where the
    cached keys (sinks + recent window) are not contiguous in position.
    """
    mask = visibility_mask(q_pos, k_pos, window, n_sink)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, n_sink: int) -> Tensor:
    if window is None:  # full causal attention: let SDPA pick a fused kernel, no mask tensor
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    pos = torch.arange(q.shape[1], device=q.device)
    return masked_attention(q, k, v, pos, pos, window, n_sink)


def _blockwise_attention(q: Tensor, k: Tensor, v: Tensor, window: int, n_sink: int) -> Tensor:
    """Sliding-window attention in O(T * w) memory, plain autograd.

    Queries are cut into blocks of w; with a window of w a query of block i only sees keys of
    blocks i-1 and i, so each block scores 2w keys (plus the n_sink sink keys) instead of T.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    w = window
    nb = -(-T // w)
    pad = nb * w - T
    # One zero block in front supplies the "previous block" of block 0; the tail pads T to nb * w.
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nb, w, Hkv, G, D)
    kp = F.pad(k, (0, 0, 0, 0, w, pad)).view(B, nb + 1, w, Hkv, D)
    vp = F.pad(v, (0, 0, 0, 0, w, pad)).view(B, nb + 1, w, Hkv, D)
    kb = torch.cat([kp[:, :-1], kp[:, 1:]], dim=2)                        # [B, nb, 2w, Hkv, D]
    vb = torch.cat([vp[:, :-1], vp[:, 1:]], dim=2)

    scale = D ** -0.5
    # Group the query heads by their kv head (head h uses kv head h // G) instead of repeating k, v.
    scores = torch.einsum("bnqhgd,bnkhd->bhgnqk", qb, kb) * scale         # [B, Hkv, G, nb, w, 2w]

    # Band mask: query a of block i is at i*w + a, key c of its 2w keys at (i-1)*w + c.
    t = torch.arange(nb * w, device=q.device).view(nb, w, 1)
    s = (torch.arange(nb, device=q.device).view(nb, 1, 1) - 1) * w + torch.arange(2 * w, device=q.device)
    band = (s <= t) & (t - s < w) & (s >= 0)                             # [nb, w, 2w]; s < 0 is padding
    scores = scores.masked_fill(~band, float("-inf"))

    if n_sink:
        n_s = min(n_sink, T)
        ks, vs = k[:, :n_s], v[:, :n_s]
        sink_scores = torch.einsum("bnqhgd,bshd->bhgnqs", qb, ks) * scale  # [B, Hkv, G, nb, w, n_s]
        # Only sinks outside the band: those inside it are already among the 2w keys.
        sink_pos = torch.arange(n_s, device=q.device)
        sink_vis = (t - sink_pos) >= w                                    # [nb, w, n_s], implies s <= t
        sink_scores = sink_scores.masked_fill(~sink_vis, float("-inf"))
        scores = torch.cat([scores, sink_scores], dim=-1)

    # The diagonal key is always visible, so no row is fully masked and softmax stays finite.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = probs.to(v.dtype)
    out = torch.einsum("bhgnqk,bnkhd->bnqhgd", probs[..., :2 * w], vb)
    if n_sink:
        out = out + torch.einsum("bhgnqs,bshd->bnqhgd", probs[..., 2 * w:], vs)
    return out.reshape(B, nb * w, H, D)[:, :T]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, n_sink: int = 0,
                     backend: str = "auto") -> Tensor:
    """Causal (optionally sliding-window, optionally with sinks) attention, scale 1/sqrt(D).

    q [B, T, H, D], k/v [B, T, Hkv, D] with H divisible by Hkv (GQA). Returns [B, T, H, D].
    """
    _check_backend(backend)
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B,T,H,D], k/v [B,T,Hkv,D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"n_heads={q.shape[2]} is not divisible by n_kv_heads={k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window={window!r} must be >= 1 or None")
    if n_sink < 0:
        raise ValueError(f"n_sink={n_sink!r} must be >= 0")
    if window is None:
        n_sink = 0  # every earlier key is already visible, sinks change nothing

    if backend == "flash" and (reason := _flash_reason(q, n_sink)) is not None:
        raise ValueError(f"backend='flash' is not applicable here: {reason}")
    if backend == "blockwise" and window is None:
        raise ValueError("backend='blockwise' needs a window; window=None is full attention (use sdpa)")

    if backend == "auto":
        if flash_applicable(q, n_sink):
            backend = "flash"
        elif window is not None and q.shape[1] > 2 * window:
            backend = "blockwise"
        else:
            backend = "sdpa"

    if backend == "flash":
        return _flash_attention(q, k, v, window)
    if backend == "blockwise":
        return _blockwise_attention(q, k, v, window, n_sink)
    return _sdpa_attention(q, k, v, window, n_sink)


@dataclass
class KVWindowCache:
    """Decoding cache of one attention layer: sink keys/values plus a rolling window.

    Keys are stored after RoPE. `k_sink` holds positions [0, n_sink) forever; `k_recent` holds the
    most recent positions >= n_sink, at most window - 1 of them (all of them when window is None),
    which is all a future query can see. Memory is therefore bounded by n_sink + window - 1.
    `position` is the absolute position of the next token.
    """

    window: int | None
    n_sink: int
    k_sink: Tensor      # [B, <= n_sink, Hkv, D]
    v_sink: Tensor
    k_recent: Tensor    # [B, <= window - 1, Hkv, D], positions position - len .. position - 1
    v_recent: Tensor
    position: int = 0

    @classmethod
    def empty(cls, batch_size: int, n_kv_heads: int, head_dim: int, window: int | None, n_sink: int,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KVWindowCache":
        def zeros() -> Tensor:
            return torch.zeros(batch_size, 0, n_kv_heads, head_dim, device=device, dtype=dtype)
        # With full attention everything is kept in k_recent; separate sinks would change nothing.
        return cls(window, n_sink if window is not None else 0, zeros(), zeros(), zeros(), zeros())

    @property
    def num_cached(self) -> int:
        return self.k_sink.shape[1] + self.k_recent.shape[1]

    def key_positions(self) -> Tensor:
        """Absolute positions of the cached keys, in the order sinks then recent."""
        n_recent = self.k_recent.shape[1]
        device = self.k_sink.device
        return torch.cat([torch.arange(self.k_sink.shape[1], device=device),
                          torch.arange(self.position - n_recent, self.position, device=device)])

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Add keys/values of the next T tokens; return (keys, values, positions) to attend over.

        The returned keys are the cache before the update followed by the new keys, so every new
        query finds all it may see; the cache then keeps only what later queries can still see.
        """
        T = k.shape[1]
        k_all = torch.cat([self.k_sink, self.k_recent, k], dim=1)
        v_all = torch.cat([self.v_sink, self.v_recent, v], dim=1)
        k_pos = torch.cat([self.key_positions(),
                           torch.arange(self.position, self.position + T, device=k.device)])

        n_new_sink = max(0, min(self.n_sink - self.position, T))  # new tokens that are sinks
        self.k_sink = torch.cat([self.k_sink, k[:, :n_new_sink]], dim=1)
        self.v_sink = torch.cat([self.v_sink, v[:, :n_new_sink]], dim=1)
        k_recent = torch.cat([self.k_recent, k[:, n_new_sink:]], dim=1)
        v_recent = torch.cat([self.v_recent, v[:, n_new_sink:]], dim=1)
        if self.window is not None:
            start = max(0, k_recent.shape[1] - (self.window - 1))
            k_recent, v_recent = k_recent[:, start:], v_recent[:, start:]
        self.k_recent, self.v_recent = k_recent, v_recent
        self.position += T
        return k_all, v_all, k_pos


class CausalSelfAttention(nn.Module):
    """Multi-head (GQA) causal self-attention with RoPE, a sliding window and sink tokens.

    Tensor parallel: query heads and kv heads are split across TP ranks (q/k/v column-parallel,
    o_proj row-parallel); with G = n_heads / n_kv_heads, rank r's query heads use exactly its kv
    heads, so attention itself needs no communication. n_heads and n_kv_heads count all ranks.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, n_kv_heads: int | None,
                 window: int | None, rope_theta: float = 10000.0, n_sink: int = 0,
                 backend: str = "auto", init_std: float = 0.02,
                 parallel: ParallelState | None = None) -> None:
        super().__init__()
        _check_backend(backend)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window={window!r} must be >= 1 or None")
        if n_sink < 0:
            raise ValueError(f"n_sink={n_sink!r} must be >= 0")
        tp = tp_size_of(parallel)
        self.parallel, self.head_dim = parallel, head_dim
        self.n_heads = divide(n_heads, tp, "model.n_heads (attention heads)")       # local heads
        self.n_kv_heads = divide(n_kv_heads, tp, "model.attention.n_kv_heads")    # local kv heads
        self.window, self.n_sink, self.rope_theta, self.backend = window, n_sink, rope_theta, backend
        self.q_proj = ColumnParallelLinear(d_model, n_heads * head_dim, parallel=parallel, input_in_region=True)
        self.k_proj = ColumnParallelLinear(d_model, n_kv_heads * head_dim, parallel=parallel, input_in_region=True)
        self.v_proj = ColumnParallelLinear(d_model, n_kv_heads * head_dim, parallel=parallel, input_in_region=True)
        self.o_proj = RowParallelLinear(n_heads * head_dim, d_model, parallel=parallel)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=init_std)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVWindowCache:
        return KVWindowCache.empty(batch_size, self.n_kv_heads, self.head_dim, self.window,
                                   self.n_sink, device=device, dtype=dtype)

    def forward(self, x: Tensor, cache: KVWindowCache | None = None,
                in_region: bool = False) -> tuple[Tensor, KVWindowCache | None]:
        """`in_region`: x already went through `enter_tp_region` (MAG shares one entry)."""
        if not in_region:
            x = enter_tp_region(x, self.parallel)   # full sequence (gathered under SP), replicated
        B, T, _ = x.shape
        start = 0 if cache is None else cache.position
        pos = torch.arange(start, start + T, device=x.device)
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), pos, self.rope_theta)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), pos, self.rope_theta)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)

        if cache is None or cache.position == 0:
            # Training forward, or a prefill from an empty cache: the long-sequence backends apply.
            y = causal_attention(q, k, v, self.window, self.n_sink, self.backend)
            if cache is not None:
                cache.append(k, v)
        else:
            k_all, v_all, k_pos = cache.append(k, v)
            y = masked_attention(q, k_all, v_all, pos, k_pos, self.window, self.n_sink)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim)), cache
