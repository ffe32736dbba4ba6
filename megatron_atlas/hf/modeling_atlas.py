"""`AtlasForCausalLM`: a thin Hugging Face wrapper around the project's AtlasLM.

The weights are AtlasLM's under the prefix `model.`. Generation uses the native recurrent cache:
per layer the memory state (which keeps updating at inference, exactly as in training's chunked
semantics) plus a KV window of `w` tokens, so the cache size does not grow with the context.
The model is stateful in the Hugging Face sense (`_is_stateful`): `generate` builds no
DynamicCache; the first forward call creates an `AtlasCache`, later calls feed only the new tokens.

This file is vendored into exported folders (see vendor.py) with its project imports rewritten.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import no_init_weights

from megatron_atlas.hf.configuration_atlas import AtlasConfig
from megatron_atlas.model.lm import LMCache, build_model


class AtlasCache:
    """The native per-layer cache plus how many input ids it has consumed."""

    def __init__(self, lm_cache: LMCache):
        self.lm_cache = lm_cache
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class AtlasPreTrainedModel(PreTrainedModel):
    config_class = AtlasConfig
    base_model_prefix = "model"
    _is_stateful = True               # recurrent cache: no DynamicCache, no assisted decoding
    _no_split_modules = ["Block"]

    @classmethod
    def get_init_context(cls, is_quantized: bool, _is_ds_init_called: bool) -> list:
        # accelerate's init_empty_weights re-creates each Parameter with its __dict__ as keyword
        # arguments, which fails on parameters carrying tensor-parallel tags; the meta device gives
        # the same empty model without that.
        if is_quantized or _is_ds_init_called:
            return super().get_init_context(is_quantized, _is_ds_init_called)
        return [no_init_weights(), torch.device("meta")]

    def _init_weights(self, module: torch.nn.Module) -> None:
        # AtlasLM initialises itself in its constructor; loading overwrites every weight anyway.
        pass


class AtlasForCausalLM(AtlasPreTrainedModel, GenerationMixin):
    def __init__(self, config: AtlasConfig):
        super().__init__(config)
        self.model = build_model(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = ["model.lm_head.weight"]
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: Tensor, past_key_values: Optional[AtlasCache] = None,
                attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """The parallel (training) forward, unless a cache is passed or use_cache=True asks for one: then
        a step of the recurrent model that returns the updated cache."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("AtlasForCausalLM has no padding support: the recurrent memory reads every "
                             "token, so pass unpadded sequences of equal length (attention_mask all ones)")
        use_cache = bool(use_cache) or past_key_values is not None
        if past_key_values is None and use_cache:
            past_key_values = AtlasCache(self.model.new_cache(input_ids.shape[0]))
        if past_key_values is None:
            logits = self.model(input_ids)
        else:
            logits = self.model.step(input_ids, past_key_values.lm_cache)
            past_key_values.seen_tokens += input_ids.shape[1]
        loss = None
        if labels is not None:   # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Optional[AtlasCache] = None,
                                      attention_mask: Optional[Tensor] = None,
                                      use_cache: Optional[bool] = None, **kwargs) -> dict:
        if past_key_values is not None:   # feed only what the cache has not seen yet
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values,
                "attention_mask": attention_mask, "use_cache": True if use_cache is None else use_cache}
