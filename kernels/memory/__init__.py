"""The memory operator: one signature, several implementations (DESIGN section 2).

    y, state = memory_forward(q, k, v, gates, params, cfg, state=None, impl="auto")
"""
from .dispatch import IMPLEMENTATIONS, memory_forward, resolve_impl
from .features import feature_dim, poly_features, poly_kernel
from .types import Gates, MemoryConfig, MemoryState, initial_state

__all__ = ["Gates", "IMPLEMENTATIONS", "MemoryConfig", "MemoryState", "feature_dim", "initial_state",
           "memory_forward", "poly_features", "poly_kernel", "resolve_impl"]
