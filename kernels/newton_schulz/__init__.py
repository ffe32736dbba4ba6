"""Quintic Newton-Schulz orthogonalisation (Muon), used by the `muon` memory rule.

`newton_schulz` is the PyTorch reference (used by the token-loop reference of the memory);
`newton_schulz_auto` runs the Triton kernel (`triton_ns`) on CUDA where it covers the shape.
"""
from .dispatch import newton_schulz_auto
from .reference import NS_COEFFICIENTS, newton_schulz

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "newton_schulz_auto"]
