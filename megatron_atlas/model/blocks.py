"""Pre-norm residual blocks (DESIGN section 3).

lmm: memory only.  mag: memory and SWA in parallel on the same input, combined as
norm(y_swa) * sigmoid(norm(y_mem)).  mal: memory sublayer, then SWA sublayer.  swa: SWA only.
attn: full causal attention (Transformer++ baseline).  Every block ends with a SwiGLU sublayer.

Under tensor parallelism each mixer and the SwiGLU is one TP region (enter: copy / SP all-gather;
exit: all-reduce / SP reduce-scatter; MAG's two mixers share one entry); the norms and the MAG
combination act on the region outputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from megatron_atlas.parallel.layers import enter_tp_region
from megatron_atlas.parallel.sharding import mark_sequence_parallel
from megatron_atlas.parallel.state import ParallelState

from .attention import CausalSelfAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .memory_layer import MemoryLayer

BlockCache = Dict[str, object]


def _attention(cfg: ModelConfig, full: bool, parallel: ParallelState | None) -> CausalSelfAttention:
    att = cfg.attention
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, att.n_kv_heads,
                               None if full else att.window, att.rope_theta, n_sink=cfg.n_persist,
                               backend=att.backend, init_std=cfg.init_std, parallel=parallel)


def _norm(cfg: ModelConfig, parallel: ParallelState | None) -> RMSNorm:
    """A d_model norm outside the TP regions: replicated, on sequence shards under SP."""
    norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    mark_sequence_parallel(norm.weight, parallel)
    return norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_hidden: int, parallel: ParallelState | None = None):
        super().__init__()
        self.kind, self.parallel = cfg.block, parallel
        # sequential sublayers, in order; `mag` runs its two mixers in parallel instead
        self.mixers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        if cfg.has_memory:
            self.mixers["memory"] = MemoryLayer(cfg, parallel)
        if cfg.has_attention:
            self.mixers["attention"] = _attention(cfg, full=cfg.block == "attn", parallel=parallel)
        if self.kind == "mag":
            self.norms["mag"] = _norm(cfg, parallel)
            self.mag_norm_attention = _norm(cfg, parallel)
            self.mag_norm_memory = _norm(cfg, parallel)
        else:
            for name in self.mixers:
                self.norms[name] = _norm(cfg, parallel)
        self.ffn_norm = _norm(cfg, parallel)
        self.ffn = SwiGLU(cfg.d_model, ffn_hidden, parallel)

    def new_cache(self, batch_size: int, device, dtype) -> BlockCache:
        cache: BlockCache = {}
        if "memory" in self.mixers:
            cache["memory"] = self.mixers["memory"].new_cache()
        if "attention" in self.mixers:
            cache["attention"] = self.mixers["attention"].new_cache(batch_size, device, dtype)
        return cache

    def forward(self, x: Tensor, cache: Optional[BlockCache] = None) -> Tuple[Tensor, Optional[BlockCache]]:
        caches = cache if cache is not None else {}
        if self.kind == "mag":
            # both branches read the same input: enter their TP regions once
            h = enter_tp_region(self.norms["mag"](x), self.parallel)
            y_mem, caches["memory"] = self.mixers["memory"](h, caches.get("memory"), in_region=True)
            y_att, caches["attention"] = self.mixers["attention"](h, caches.get("attention"), in_region=True)
            x = x + self.mag_norm_attention(y_att) * torch.sigmoid(self.mag_norm_memory(y_mem))
        else:
            for name, mixer in self.mixers.items():
                y, caches[name] = mixer(self.norms[name](x), caches.get(name))
                x = x + y
        x = x + self.ffn(self.ffn_norm(x))
        return x, cache
