"""A faster encoder for GPT-2-style byte-level BPE tokenizers, checked against the HF tokenizer.

`tokenizers` spends most of its time per byte in its BPE loop; tiktoken runs the same algorithm on
the same regex about 3x faster. For a tokenizer.json that is a plain byte-level BPE (no normalizer,
the GPT-2 split regex, every byte in the vocabulary, merge results ranked in merge order) the two give
the same ids, so `prepare_data` encodes with tiktoken. Anything else keeps the HF tokenizer.

Every encoding is still checked: in each batch a deterministic sample of documents (the first and
then every `check_every`-th) is also encoded by the HF tokenizer. Documents containing
an added token's text (which HF turns into that token) always go through HF. On any difference that
batch is re-encoded by HF and counted, so the output depends only on the batch's text, never on
which batches a worker process saw before.

Long documents are encoded in pieces of about `max_piece_chars` (memory: the HF tokenizer keeps
~150 bytes per character of a text it encodes, so one 50 MB line took 8 GB). A piece ends before a
space that has a non-space character on either side: the GPT-2 regex splits there in any case (no
pre-token reaches across such a space), so the pieces' ids, concatenated, are the document's ids.
Only tokenizers whose pre-tokenizer is exactly that regex are split.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from megatron_atlas.data.tokenizer import Tokenizer

# The pre-tokenizer regex of `pre_tokenizers.ByteLevel(use_regex=True)` (GPT-2's).
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# A space between two non-space characters: a pre-token boundary of BYTE_LEVEL_PATTERN on both sides.
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")
MAX_PIECE_CHARS = 1 << 18


def splits_safely(spec: dict) -> bool:
    """True when cutting a text at `_SAFE_CUT` leaves the tokenizer's ids unchanged: a lone GPT-2
    byte-level pre-tokenizer, no normalizer, no added token that holds whitespace."""
    pre = spec.get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and spec.get("normalizer") is None
            and not any(re.search(r"\s", t["content"]) for t in spec.get("added_tokens", [])))


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut at the first safe space after every `max_chars` characters (whole if it has none)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def byte_level_alphabet() -> dict[str, int]:
    """Maps each of the 256 printable stand-in characters of byte-level BPE back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:   # control and space-like bytes are moved past 255 so every token is printable
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


def _mergeable_ranks(spec: dict) -> Optional[dict[bytes, int]]:
    """Token bytes -> id, when the tokenizer.json is a byte-level BPE tiktoken can reproduce."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain_bpe = (model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
                 and not model.get("ignore_merges"))
    byte_level = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space"))
    if not (plain_bpe and byte_level) or spec.get("normalizer") is not None:
        return None
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    alphabet = byte_level_alphabet()
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if token in specials:
            continue
        if any(ch not in alphabet for ch in token):
            return None
        ranks[bytes(alphabet[ch] for ch in token)] = rank
    if len({r for r in ranks.values()}) != len(ranks) or any(bytes([b]) not in ranks for b in range(256)):
        return None   # tiktoken needs every single byte; a vocabulary without some drops them instead
    # tiktoken merges by the rank of the merged token, HF by merge order: equal when they agree
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        rank = model["vocab"].get(left + right)
        if rank is None or rank <= previous:
            return None
        previous = rank
    return ranks


class FastByteLevelEncoder:
    """`encode_batch` like `Tokenizer.encode_batch`, via tiktoken when provably equivalent."""

    def __init__(self, tok: Tokenizer, check_every: int = 64, max_piece_chars: int = MAX_PIECE_CHARS) -> None:
        self.tok, self.check_every = tok, max(1, check_every)
        spec = json.loads(tok.to_json())
        self.specials = [t["content"] for t in spec.get("added_tokens", [])]
        self.max_piece_chars = max_piece_chars if splits_safely(spec) else None
        self.fallback_reason: Optional[str] = None
        self.mismatched_batches = 0   # batches where a checked document differed (re-encoded by HF)
        self.encoding = None
        ranks = _mergeable_ranks(spec)
        if ranks is None:
            self.fallback_reason = "not a plain byte-level BPE with every byte in its vocabulary"
            return
        try:
            import tiktoken
        except ImportError:
            self.fallback_reason = "tiktoken is not installed"
            return
        self.encoding = tiktoken.Encoding("megatron-atlas-bpe", pat_str=BYTE_LEVEL_PATTERN,
                                          mergeable_ranks=ranks, special_tokens={})

    @property
    def active(self) -> bool:
        return self.encoding is not None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        limit = self.max_piece_chars
        if limit is None or all(len(t) <= limit for t in texts):
            return self._encode_batch(texts)
        pieces, owners = [], []
        for i, text in enumerate(texts):
            parts = split_text(text, limit)
            pieces += parts
            owners += [i] * len(parts)
        ids: list[list[int]] = [[] for _ in texts]
        for owner, encoded in zip(owners, self._encode_batch(pieces)):
            ids[owner].extend(encoded)
        return ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.encoding is None:
            return self.tok.encode_batch(texts)
        fast = [i for i, t in enumerate(texts) if not any(s in t for s in self.specials)]
        ids: list[Optional[list[int]]] = [None] * len(texts)
        for i, encoded in zip(fast, self.encoding.encode_ordinary_batch([texts[i] for i in fast], num_threads=1)):
            ids[i] = encoded
        checked = set(fast[::self.check_every])
        slow = [i for i in range(len(texts)) if ids[i] is None or i in checked]
        for i, encoded in zip(slow, self.tok.encode_batch([texts[i] for i in slow])):
            if ids[i] is not None and ids[i] != encoded:
                self.mismatched_batches += 1
                return self.tok.encode_batch(texts)
            ids[i] = encoded
        return ids   # type: ignore[return-value]
