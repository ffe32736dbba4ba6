"""The memory operator's configuration, gates and carried state (DESIGN section 2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import torch

KINDS = ("linear", "mlp", "gated_mlp")
RULES = ("gd", "muon", "muon_block")
LOSSES = ("l2", "dot")
# The weight matrices each memory kind learns, and which of them read the (lifted) key directly.
WEIGHT_NAMES = {"linear": ("W",), "mlp": ("W1", "W2"), "gated_mlp": ("W1", "W2", "W3")}
FIRST_LAYER = frozenset({"W", "W2", "W3"})


@dataclass(frozen=True)
class MemoryConfig:
    """Options of the memory operator; every field has a default, so `MemoryConfig()` is Titans-like."""

    kind: str = "mlp"
    rule: str = "gd"
    loss: str = "l2"
    window: int = 1
    chunk: int = 16
    degree: int = 1
    ns_steps: int = 5
    ns_block: int = 1     # muon_block: tokens per orthogonalisation (1: exactly `muon`)
    state_dtype: torch.dtype = torch.float32
    # retention pulls the fast weights back towards the learned initial weights W0 (the params):
    # W_t = W0 + alpha_t (W_{t-1} - W0) - ...; False: towards zero, as the papers write it. Decaying
    # W0 away leaves a state the model never saw within its training length (docs/design.md)
    anchor: bool = True

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("rule", self.rule, RULES),
                                     ("loss", self.loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"MemoryConfig.{name}={value!r}; allowed: {', '.join(allowed)}")
        for name in ("window", "chunk", "degree", "ns_steps", "ns_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryConfig.{name}={value!r} must be an integer >= 1")
        if self.rule == "muon_block" and self.ns_block % self.chunk and self.chunk % self.ns_block:
            raise ValueError(f"MemoryConfig.ns_block={self.ns_block} must divide chunk={self.chunk} or be a "
                             "multiple of it (orthogonalisation blocks end on the chunk grid)")

    @property
    def weight_names(self) -> tuple:
        return WEIGHT_NAMES[self.kind]


class Gates(NamedTuple):
    """Per-token, per-head gates, each [B, T, H] in (0, 1).

    `theta=None` means no momentum (S_t carries nothing over); `g=None` means every window gate is 1.
    """

    alpha: torch.Tensor
    eta: torch.Tensor
    theta: Optional[torch.Tensor] = None
    g: Optional[torch.Tensor] = None


@dataclass
class MemoryState:
    """What one call hands to the next: fast weights, momentum, and the last c-1 window tokens.

    weights/momentum: name -> [B, H, out, in]. window_k: [B, c-1, H, d_k] (unlifted keys),
    window_v: [B, c-1, H, d_v], window_g: [B, c-1, H]; tokens that do not exist yet have g = 0.
    block (rule `muon_block` only): the open orthogonalisation block, "start.<name>" (its start
    weights, decayed by the retention since) [B, H, out, in], and "lr" [B, H, 1, 1] (its summed
    decayed learning rate); block_tokens: how many of its tokens are already in.
    """

    weights: Dict[str, torch.Tensor]
    momentum: Dict[str, torch.Tensor]
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_g: torch.Tensor
    block: Dict[str, torch.Tensor] = field(default_factory=dict)
    block_tokens: int = 0


def initial_state(params: Dict[str, torch.Tensor], cfg: MemoryConfig, batch: int, d_k: int,
                  d_v: int, dtype: torch.dtype, device: torch.device) -> MemoryState:
    """The state before the first token: the learned initial weights broadcast over the batch."""
    weights = {n: params[n].to(dtype).unsqueeze(0).expand(batch, *params[n].shape)
               for n in cfg.weight_names}
    heads = params[cfg.weight_names[0]].shape[0]
    zeros = dict(dtype=dtype, device=device)
    block = {}
    if cfg.rule == "muon_block":
        block = {**{f"start.{n}": w for n, w in weights.items()}, "lr": torch.zeros(batch, heads, 1, 1, **zeros)}
    return MemoryState(
        weights=weights,
        momentum={n: torch.zeros_like(w) for n, w in weights.items()},
        window_k=torch.zeros(batch, cfg.window - 1, heads, d_k, **zeros),
        window_v=torch.zeros(batch, cfg.window - 1, heads, d_v, **zeros),
        window_g=torch.zeros(batch, cfg.window - 1, heads, **zeros),
        block=block,
    )
