"""Pre-norm residual blocks (DESIGN section 3).

lmm: memory only.  mag: memory and SWA in parallel on the same input, combined as
norm(y_swa) * sigmoid(norm(y_mem)).  mal: memory sublayer, then SWA sublayer.  swa: SWA only.
attn: full causal attention (Transformer++ baseline).  Every block ends with a SwiGLU sublayer.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import CausalSelfAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .memory_layer import MemoryLayer

BlockCache = Dict[str, object]


def _attention(cfg: ModelConfig, full: bool) -> CausalSelfAttention:
    att = cfg.attention
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, att.n_kv_heads,
                               None if full else att.window, att.rope_theta, n_sink=cfg.n_persist,
                               backend=att.backend, init_std=cfg.init_std)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_hidden: int):
        super().__init__()
        self.kind = cfg.block
        # sequential sublayers, in order; `mag` runs its two mixers in parallel instead
        self.mixers = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        if cfg.has_memory:
            self.mixers["memory"] = MemoryLayer(cfg)
        if cfg.has_attention:
            self.mixers["attention"] = _attention(cfg, full=cfg.block == "attn")
        if self.kind == "mag":
            self.norms["mag"] = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mag_norm_attention = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mag_norm_memory = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            for name in self.mixers:
                self.norms[name] = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, ffn_hidden)

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
            h = self.norms["mag"](x)
            y_mem, caches["memory"] = self.mixers["memory"](h, caches.get("memory"))
            y_att, caches["attention"] = self.mixers["attention"](h, caches.get("attention"))
            x = x + self.mag_norm_attention(y_att) * torch.sigmoid(self.mag_norm_memory(y_mem))
        else:
            for name, mixer in self.mixers.items():
                y, caches[name] = mixer(self.norms[name](x), caches.get(name))
                x = x + y
        x = x + self.ffn(self.ffn_norm(x))
        return x, cache
