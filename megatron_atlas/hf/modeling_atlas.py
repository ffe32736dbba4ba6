"""`AtlasForCausalLM`: a thin Hugging Face wrapper around the project's AtlasLM.

The weights are AtlasLM's under the prefix `model.`. Generation uses the native recurrent cache:
per layer the memory state (which keeps updating at inference, exactly as in training's chunked
semantics) plus a KV window of `w` tokens, so the cache size does not grow with the context.
The model is stateful in the Hugging Face sense (`_is_stateful`): `generate` builds no
DynamicCache; the first forward call creates an `AtlasCache` (cache.py: left padding, beam
reordering), later calls feed only the new tokens.

This file is vendored into exported folders (see vendor.py) with its project imports rewritten.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import no_init_weights

from megatron_atlas.hf.cache import AtlasCache, left_pad_counts
from megatron_atlas.hf.configuration_atlas import AtlasConfig
from megatron_atlas.model.lm import build_model


class AtlasPreTrainedModel(PreTrainedModel):
    config_class = AtlasConfig
    base_model_prefix = "model"
    _is_stateful = True               # recurrent cache: no DynamicCache, no assisted decoding
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

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

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint
                                    ) -> None:
        """Recompute each block in backward (training forward only; cached decoding runs as is).
        The block's forward is wrapped on the instance, so state-dict names do not change."""
        self.gradient_checkpointing = enable   # what `is_gradient_checkpointing` reads
        for block in self.model.blocks:
            block.__dict__.pop("forward", None)   # back to the class's forward
            if enable:
                block.forward = partial(_recomputed, block.forward, gradient_checkpointing_func)

    def forward(self, input_ids: Tensor, past_key_values: Optional[AtlasCache] = None,
                attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        """The parallel (training) forward, unless a cache is passed or use_cache=True asks for one: then
        a step of the recurrent model that returns the updated cache. Left-padded rows (attention_mask)
        give the outputs of their unpadded selves; pad columns get zero logits."""
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("AtlasForCausalLM has a single token type; got non-zero token_type_ids")
        use_cache = bool(use_cache) or past_key_values is not None
        if use_cache:
            cache = past_key_values if past_key_values is not None else AtlasCache()
            mask = attention_mask
            if mask is not None and mask.shape[1] == cache.seen_tokens + input_ids.shape[1]:
                mask = mask[:, cache.seen_tokens:]   # generate passes the mask of the whole sequence
            pads = left_pad_counts(mask, input_ids.shape, allow_right=False)
            logits = cache.step(self.model.step, self.model.new_cache, input_ids, pads)
        else:
            cache = None
            logits = self._padded_forward(input_ids, left_pad_counts(attention_mask, input_ids.shape, True))
        loss = None
        if labels is not None:   # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _padded_forward(self, input_ids: Tensor, pads: Tensor) -> Tensor:
        if not bool(pads.any()):
            return self.model(input_ids)
        logits = None
        for pad in sorted(set(pads.tolist())):   # rows of one pad count run together, unpadded
            rows = (pads == pad).nonzero().flatten().to(input_ids.device)
            out = self.model(input_ids[rows, pad:])
            if logits is None:
                logits = out.new_zeros(*input_ids.shape, out.shape[-1])
            logits[rows, pad:] = out
        return logits

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Optional[AtlasCache] = None,
                                      attention_mask: Optional[Tensor] = None,
                                      use_cache: Optional[bool] = None, **kwargs) -> dict:
        if past_key_values is not None:   # feed only what the cache has not seen yet
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values,
                "attention_mask": attention_mask, "use_cache": True if use_cache is None else use_cache}


def _recomputed(plain: Callable, checkpoint: Callable, x: Tensor, cache=None):
    if cache is None and torch.is_grad_enabled():
        return checkpoint(plain, x)
    return plain(x, cache)
