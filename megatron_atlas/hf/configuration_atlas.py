"""`AtlasConfig`: the project's ModelConfig carried inside a Hugging Face PretrainedConfig.

The full (resolved) ModelConfig is stored as the nested dict `atlas`; the usual HF names
(vocab_size, hidden_size, ...) are mirrored for tools that read them. This file is vendored into
exported folders (see vendor.py), so it imports only the model's config module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from transformers import PretrainedConfig

from megatron_atlas.model.config import AttentionConfig, MemoryLayerConfig, ModelConfig


def model_config_from_dict(d: Dict[str, Any]) -> ModelConfig:
    d = dict(d)
    memory = MemoryLayerConfig(**d.pop("memory", {}))
    attention = AttentionConfig(**d.pop("attention", {}))
    return ModelConfig(**d, memory=memory, attention=attention).validate()


class AtlasConfig(PretrainedConfig):
    model_type = "megatron_atlas"

    def __init__(self, atlas: Optional[Dict[str, Any]] = None, atlas_train: Optional[Dict[str, Any]] = None,
                 max_position_embeddings: Optional[int] = None, **kwargs):
        self.atlas = dict(atlas or dataclasses.asdict(ModelConfig()))
        self.atlas_train = atlas_train    # the training config of the exported run (for re-import)
        # The trained sequence length. The recurrent model reads longer inputs, but tools that size
        # their windows by this field (lm-eval's loglikelihood_rolling) should use what it saw.
        self.max_position_embeddings = max_position_embeddings or (atlas_train or {}).get("seq_len")
        cfg = model_config_from_dict(self.atlas)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.num_attention_heads = cfg.n_heads
        kwargs["tie_word_embeddings"] = cfg.tie_embeddings
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_dict(self.atlas)
