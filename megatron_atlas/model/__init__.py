"""Model: memory layer, attention branches, blocks and the causal LM."""
from .config import AttentionConfig, ConfigError, MemoryLayerConfig, ModelConfig
from .lm import AtlasLM, LMCache, build_model, resolve_ffn_hidden

__all__ = ["AtlasLM", "AttentionConfig", "ConfigError", "LMCache", "MemoryLayerConfig", "ModelConfig",
           "build_model", "resolve_ffn_hidden"]
