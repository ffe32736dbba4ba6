"""Tokenizer files for exported folders and a tokenizer for the evaluation suites.

The project's text tokenizers are `tokenizers` JSON files (trained byte-level BPE, saved next to the
data shards and named by index.json). Models trained without one (synthetic MQAR, byte-level text)
use ids = raw bytes; `byte_tokenizer()` is that tokenizer as a real tokenizer.json (a BPE with the
256 byte symbols as its vocabulary and no merges), so `AutoTokenizer` and the evaluations can encode
text for a 256-id model.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BYTE_VOCAB = 256
PAD_TOKEN = "<|pad|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> Dict[int, str]:
    """The byte -> printable symbol table of byte-level BPE (GPT-2's): printable bytes map to
    themselves, the others to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(BYTE_VOCAB):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(BYTE_VOCAB + extra)
            extra += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """Token id = byte value (UTF-8), 256 ids, lossless on any text."""
    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def resolve_tokenizer_file(spec: Optional[str], run_config: Optional[dict] = None) -> Optional[Path]:
    """A tokenizer.json from `spec` (a file, or a folder holding tokenizer.json such as a shard
    folder or an HF export), else from the run's shard folder; None means the byte tokenizer."""
    if spec:
        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {spec}: no tokenizer.json there")
        return path
    data = ((run_config or {}).get("train") or {}).get("data") or {}
    if data.get("kind") == "shards":
        path = Path(data["shards"]["path"]) / "tokenizer.json"
        if path.is_file():
            return path
    return None


def load_tokenizer(spec: Optional[str], run_config: Optional[dict] = None) -> Tokenizer:
    path = resolve_tokenizer_file(spec, run_config)
    return byte_tokenizer() if path is None else Tokenizer.from_file(str(path))


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, vocab_size: int,
                      model_max_length: Optional[int] = None) -> Dict[str, Optional[int]]:
    """Write tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` reads as a
    PreTrainedTokenizerFast (no custom code); returns the special token ids (eos, bos, pad).

    The end-of-document token, if the tokenizer has one, is eos, bos (documents are packed with it
    between them) and pad (left-padded rows run unpadded, so pads never reach the model; and HF
    infers no mask from a pad equal to eos). The byte-level tokenizer has no spare id: its pad is
    an added `<|pad|>` with the id after the last byte (256), outside the model's ids, so that no
    real byte is ever taken for padding. No token_type_ids (the model has none).
    """
    from transformers import PreTrainedTokenizerFast

    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} ids but the model only {vocab_size}")
    special = {}
    for name in ("<|endoftext|>", "</s>", "<eos>"):
        if tokenizer.token_to_id(name) is not None:
            special = {"eos_token": name, "bos_token": name, "pad_token": name}
            break
    if not special:   # the byte-level tokenizer: a pad id past the model's ids, never a real byte
        tokenizer.add_special_tokens([PAD_TOKEN])
        special = {"pad_token": PAD_TOKEN}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"], **special)
    if model_max_length:
        fast.model_max_length = model_max_length
    fast.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    return {"eos_token_id": fast.eos_token_id, "bos_token_id": fast.bos_token_id,
            "pad_token_id": fast.pad_token_id}
