"""The memory operator: one signature, several implementations (DESIGN section 2).

    y, state = memory_forward(q, k, v, gates, params, cfg, state=None, impl="auto")

impl: "reference" (token loop), "chunked" (PyTorch dual form), "triton" (fused kernels for the
linear memory with the gd rule), "auto" (triton where it covers the call on CUDA, else chunked).
See NOTES.md for coverage and memory traffic.
"""
from .dispatch import IMPLEMENTATIONS, memory_forward, resolve_impl
from .features import feature_dim, poly_features, poly_kernel
from .types import Gates, MemoryConfig, MemoryState, initial_state

__all__ = ["Gates", "IMPLEMENTATIONS", "MemoryConfig", "MemoryState", "feature_dim", "initial_state",
           "memory_forward", "poly_features", "poly_kernel", "resolve_impl"]
