"""A Hugging Face `tokenizers` tokenizer with an end-of-document token and a stable hash.

    tok = Tokenizer.from_file("tokenizer.json")          # any HF tokenizer.json
    tok = train_bpe(texts, vocab_size=8192)              # byte-level BPE, offline
    tok.encode_batch(["a doc", "another"]); tok.eod_id; tok.sha256

The hash is the sha256 of the tokenizer's JSON, so index.json can tell which tokenizer made a set of
shards (and a loader can refuse shards made by another one).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
# Names other tokenizers give their end-of-document token, tried in order when loading one.
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer:
    """Wraps `tokenizers.Tokenizer`; `eod_id` is appended after every document when packing."""

    def __init__(self, hf: _HFTokenizer, eod_token: Optional[str] = None) -> None:
        self.hf = hf
        names = (eod_token,) if eod_token else _EOD_CANDIDATES
        ids = [hf.token_to_id(name) for name in names]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        if found:
            self.eod_token, self.eod_id = found[0]
        else:   # none present: add one (the vocabulary grows by one id)
            self.eod_token = eod_token or EOD_TOKEN
            hf.add_special_tokens([self.eod_token])
            self.eod_id = hf.token_to_id(self.eod_token)

    @classmethod
    def from_file(cls, path: str | Path, eod_token: Optional[str] = None) -> "Tokenizer":
        return cls(_HFTokenizer.from_file(str(path)), eod_token)

    @classmethod
    def from_json(cls, text: str, eod_token: Optional[str] = None) -> "Tokenizer":
        return cls(_HFTokenizer.from_str(text), eod_token)

    @property
    def vocab_size(self) -> int:
        """Ids run over [0, vocab_size), special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets: ~1.5x faster, same ids
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, eod_token: str = EOD_TOKEN) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids in all (the end-of-document token included).

    With room for all 256 byte symbols the tokenizer is lossless on any input. Below that (e.g. a
    256-id model vocabulary) only the byte symbols seen in `texts` are kept, so bytes never seen in
    training are dropped at encoding time; fine for demos, not for real runs.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be >= 2")
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    full = pre_tokenizers.ByteLevel.alphabet()
    options = dict(initial_alphabet=full) if vocab_size > len(full) else dict(limit_alphabet=vocab_size - 1)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=False,
                                  **options)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, eod_token)
