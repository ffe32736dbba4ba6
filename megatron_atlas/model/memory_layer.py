"""The memory layer (DESIGN section 3): projections -> short conv -> SiLU -> L2 norm -> memory
operator -> per-head RMSNorm -> output gate -> output projection.

Decoding reproduces the chunked training semantics exactly: inside a chunk all inner gradients are
taken at the chunk-start weights, so the cache keeps the state at the last chunk boundary plus the
(fewer than `chunk`) projected tokens since, and re-reads the open chunk from that state.

Tensor parallelism splits the heads: every per-head tensor (q/k/v projection rows, conv channels,
gates, memory weights, output norm and gate) is laid out head-major, so rank r holds a contiguous
block of whole heads, and the memory operator runs on its local heads with no communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.memory import Gates, MemoryConfig, MemoryState, feature_dim, memory_forward

from megatron_atlas.parallel.collectives import copy_to_tp_region
from megatron_atlas.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region
from megatron_atlas.parallel.sharding import divide, mark_tensor_parallel, tp_size_of
from megatron_atlas.parallel.state import ParallelState

from .config import ModelConfig
from .layers import RMSNorm, ShortConv

# Gate biases at init: retention ~0.993, inner lr ~0.12 * max_lr, momentum ~0.5, window gate ~0.88.
_GATE_BIAS = {"alpha": 5.0, "eta": -2.0, "theta": 0.0, "g": 2.0}


@dataclass
class MemoryLayerCache:
    conv: Optional[Tensor] = None                 # last conv_width-1 projected inputs
    state: Optional[MemoryState] = None           # memory state at the last chunk boundary
    pending: Dict[str, Tensor] = field(default_factory=dict)  # projected tokens since then


class MemoryLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState | None = None):
        super().__init__()
        mem = cfg.memory
        self.parallel = parallel
        self.d_k, self.d_v = cfg.mem_key_dim, cfg.resolved_head_dim
        # parameters are built for all heads (same init at any TP degree), then sharded by the LM
        self.heads = divide(cfg.n_heads, tp_size_of(parallel), "model.n_heads (memory heads)")
        heads = cfg.n_heads
        self.op_cfg = MemoryConfig(mem.kind, mem.rule, mem.loss, mem.window, mem.chunk, mem.degree,
                                   mem.ns_steps, mem.ns_block, anchor=mem.anchor)
        self.impl, self.max_lr = mem.impl, mem.max_lr
        vv = heads * self.d_v
        # rows per head: [q_h (d_k), k_h (d_k), v_h (d_v)]; the conv channels follow them
        self.qkv = ColumnParallelLinear(cfg.d_model, heads * (2 * self.d_k + self.d_v), parallel=parallel,
                                        input_in_region=True)
        self.conv = ShortConv(heads * (2 * self.d_k + self.d_v), mem.conv_width)
        self.gate_names = ("alpha", "eta", "theta", "g") if mem.momentum else ("alpha", "eta", "g")
        # rows per head: one per gate name
        self.gates = ColumnParallelLinear(cfg.d_model, len(self.gate_names) * heads, bias=True,
                                          parallel=parallel, input_in_region=True)
        self.out_norm = RMSNorm(vv, cfg.norm_eps, groups=heads)
        mark_tensor_parallel(self.out_norm.weight, 0)
        self.out_gate = ColumnParallelLinear(cfg.d_model, vv, parallel=parallel, input_in_region=True)
        self.out_proj = RowParallelLinear(vv, cfg.d_model, parallel=parallel)
        self.memory_params = nn.ParameterDict(self._initial_memory(cfg))
        for param in self.memory_params.values():
            mark_tensor_parallel(param, 0)
        if mem.degree > 1:  # a_i = softplus(raw_i), initialised to 1/i! (a Taylor expansion of exp)
            init = torch.tensor([1.0 / math.factorial(i) for i in range(mem.degree + 1)])
            self.feature_coef_raw = nn.Parameter(init.expm1().log())
        self._init_weights(cfg.init_std)

    def _initial_memory(self, cfg: ModelConfig) -> Dict[str, nn.Parameter]:
        width = feature_dim(self.d_k, cfg.memory.degree)
        hidden = cfg.memory.expansion * self.d_v
        shapes = {"linear": {"W": (self.d_v, width)},
                  "mlp": {"W1": (self.d_v, hidden), "W2": (hidden, width)},
                  "gated_mlp": {"W1": (self.d_v, hidden), "W2": (hidden, width), "W3": (hidden, width)}}
        return {name: nn.Parameter(torch.randn(cfg.n_heads, *shape) * shape[1] ** -0.5)
                for name, shape in shapes[cfg.memory.kind].items()}

    def _init_weights(self, std: float) -> None:
        for linear in (self.qkv, self.gates, self.out_gate, self.out_proj):
            nn.init.normal_(linear.weight, std=std)
        with torch.no_grad():
            bias = self.gates.bias.view(-1, len(self.gate_names))
            for i, name in enumerate(self.gate_names):
                bias[:, i].fill_(_GATE_BIAS[name])

    def operator_params(self) -> Dict[str, Tensor]:
        params = dict(self.memory_params.items())
        if self.op_cfg.degree > 1:  # shared by all heads: sum its gradient over the TP ranks' heads
            group = None if self.parallel is None else self.parallel.tp_group
            params["a"] = copy_to_tp_region(F.softplus(self.feature_coef_raw), group)
        return params

    def _project(self, x: Tensor, conv_cache: Optional[Tensor]) -> Tuple[Dict[str, Tensor], Tensor]:
        """Per-token q, k, v [B, T, H, d] and gates [B, T, H] of the memory (H = local heads)."""
        batch, length, _ = x.shape
        mixed, conv_cache = self.conv(self.qkv(x), conv_cache)
        mixed = F.silu(mixed).view(batch, length, self.heads, 2 * self.d_k + self.d_v)
        q, k, v = mixed.split([self.d_k, self.d_k, self.d_v], dim=-1)
        tokens = {"q": F.normalize(q, dim=-1), "k": F.normalize(k, dim=-1), "v": v}
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        gate_values = torch.sigmoid(self.gates(x).to(gate_dtype)).view(
            batch, length, self.heads, len(self.gate_names))
        for i, name in enumerate(self.gate_names):
            tokens[name] = gate_values[..., i]
        tokens["eta"] = tokens["eta"] * self.max_lr
        return tokens, conv_cache

    def _memory(self, tokens: Dict[str, Tensor], state: Optional[MemoryState]):
        gates = Gates(tokens["alpha"], tokens["eta"], tokens.get("theta"), tokens["g"])
        return memory_forward(tokens["q"], tokens["k"], tokens["v"], gates, self.operator_params(),
                              self.op_cfg, state=state, impl=self.impl)

    def _read_with_cache(self, tokens: Dict[str, Tensor], cache: MemoryLayerCache) -> Tensor:
        """Outputs for the new tokens; commits the state at every completed chunk boundary."""
        new = tokens["q"].shape[1]
        if cache.pending:
            tokens = {n: torch.cat([cache.pending[n], t], dim=1) for n, t in tokens.items()}
        total = tokens["q"].shape[1]
        full = total - total % self.op_cfg.chunk
        outputs = []
        if full:
            y, cache.state = self._memory({n: t[:, :full] for n, t in tokens.items()}, cache.state)
            outputs.append(y)
        cache.pending = {n: t[:, full:] for n, t in tokens.items()}
        if total > full:
            outputs.append(self._memory(cache.pending, cache.state)[0])
        return torch.cat(outputs, dim=1)[:, total - new:]

    def forward(self, x: Tensor, cache: Optional[MemoryLayerCache] = None, in_region: bool = False
                ) -> Tuple[Tensor, Optional[MemoryLayerCache]]:
        """`in_region`: x already went through `enter_tp_region` (MAG shares one entry)."""
        if not in_region:
            x = enter_tp_region(x, self.parallel)   # full sequence (gathered under SP), replicated
        tokens, conv_cache = self._project(x, None if cache is None else cache.conv)
        if cache is None:
            y = self._memory(tokens, None)[0]
        else:
            cache.conv = conv_cache
            y = self._read_with_cache(tokens, cache)
        y = self.out_norm(y.flatten(2).to(x.dtype))
        return self.out_proj(y * torch.sigmoid(self.out_gate(x))), cache

    def new_cache(self) -> MemoryLayerCache:
        return MemoryLayerCache()
