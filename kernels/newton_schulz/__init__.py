"""Quintic Newton-Schulz orthogonalisation (Muon), used by the `muon` memory rule."""
from .reference import NS_COEFFICIENTS, newton_schulz

__all__ = ["NS_COEFFICIENTS", "newton_schulz"]
