"""Models under evaluation: a native checkpoint, an exported folder of this project, or any Hugging
Face causal LM folder, behind one small interface.

    lm = load_lm("runs/atlas-tiny")                 # run folder, step folder, or state-dict file
    logits = lm.forward(ids)                        # [B, T] -> [B, T, V], the parallel forward
    logits, state = lm.prefill(ids)                 # streamed through the recurrent cache in chunks
    logits = lm.extend(state, ids)                  # continue a (copied) state

Native models and this project's exports run as AtlasLM (`step` with its cache: memory state +
KV window), other HF models through `past_key_values`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron_atlas.hf.tokenizer import byte_tokenizer, load_tokenizer


@dataclass
class EvalLM:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    run_config: dict = field(default_factory=dict)
    native: bool = True
    prefill_chunk: int = 2048        # tokens per cached step while reading a long prompt

    @property
    def vocab_size(self) -> int:
        if self.native:
            return self.model.cfg.vocab_size
        return self.model.config.vocab_size

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids) if self.native else self.model(ids).logits

    @torch.no_grad()
    def extend(self, state: Any, ids: Tensor) -> Tensor:
        """Logits [B, T, V] of `ids` after what `state` has read; `state` is updated in place."""
        if self.native:
            return self.model.step(ids, state)
        out = self.model(ids, past_key_values=state[0], use_cache=True)
        state[0] = out.past_key_values
        return out.logits

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tuple[Tensor, Any]:
        """Reads `ids` [B, T] chunk by chunk; returns all logits [B, T, V] and the state after them."""
        state = self.model.new_cache(ids.shape[0]) if self.native else [None]
        chunks = [self.extend(state, part) for part in ids.split(self.prefill_chunk, dim=1)]
        return torch.cat(chunks, dim=1), state

    def copy_state(self, state: Any) -> Any:
        return copy.deepcopy(state)

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _load_foreign(path: Path, trust_remote_code: bool) -> torch.nn.Module:
    """Any HF causal LM. Its folder's own Python files (auto_map) run only with trust_remote_code."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code).eval()
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"{path} ships its own model code (auto_map in config.json), and loading it would run "
                         "that code: pass --trust-remote-code if you trust this folder") from None


def load_lm(spec: str, tokenizer: Optional[str] = None, name: Optional[str] = None,
            config: Optional[str] = None, trust_remote_code: bool = False) -> EvalLM:
    """`spec`: a native checkpoint (run folder, step folder or state-dict file) or an HF folder.
    This project's exports load as AtlasLM from their safetensors and config.json (none of the
    folder's code runs); another folder's code runs only with `trust_remote_code`."""
    path = Path(spec)
    label = name or path.name
    if _is_hf_folder(path):
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "megatron_atlas":
            from megatron_atlas.hf.convert import load_hf_weights
            from megatron_atlas.model import build_model

            cfg, weights, train = load_hf_weights(path)
            model = build_model(cfg)
            model.load_state_dict(weights)
            run_config = {"model": {}, "train": train or {}}
            tok = load_tokenizer(tokenizer or (str(path) if (path / "tokenizer.json").is_file() else None))
            return EvalLM(label, model.eval(), tok, run_config)
        from tokenizers import Tokenizer

        model = _load_foreign(path, trust_remote_code)
        tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.json"
        tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else byte_tokenizer()
        return EvalLM(label, model, tok, {}, native=False)
    from megatron_atlas.hf.convert import load_native
    from megatron_atlas.model import build_model

    cfg, weights, run_config = load_native(path, config)
    model = build_model(cfg)
    model.load_state_dict(weights)
    if label in ("", ".") or label.startswith("step-"):
        label = f"{cfg.preset}:{path.name}"
    return EvalLM(label, model.eval(), load_tokenizer(tokenizer, run_config), run_config)


def unique_names(lms: Sequence[EvalLM]) -> None:
    """Make model names unique (the results and the plot legend are keyed by them)."""
    seen: dict = {}
    for lm in lms:
        if lm.name in seen:
            seen[lm.name] += 1
            lm.name = f"{lm.name}#{seen[lm.name]}"
        else:
            seen[lm.name] = 0
