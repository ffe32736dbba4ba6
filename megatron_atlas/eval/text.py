"""Deterministic filler text for the long-context suites, built as token ids sentence by sentence.

Prompts are assembled from separately encoded pieces (sentences, needle, facts, question), so the
position of every piece in the prompt is known exactly and a prompt can be cut to an exact token
length. Filler sentences use their own small vocabulary, disjoint from the needle words, the names
and the places of the tasks, so nothing in the haystack can be mistaken for an answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Protocol, Sequence

FILLER_ADJECTIVES = ("quiet", "bright", "heavy", "gentle", "distant", "narrow", "ancient", "patient",
                     "silver", "humble", "rapid", "hollow", "steady", "vivid", "modest", "rough")
FILLER_NOUNS = ("river", "mountain", "teacher", "window", "engine", "harbor", "letter", "forest",
                "market", "village", "machine", "valley", "painter", "lantern", "bridge", "meadow")
FILLER_VERBS = ("watches", "follows", "remembers", "carries", "crosses", "describes", "shelters",
                "measures", "admires", "reaches", "visits", "ignores", "repairs", "outlasts")


class TextTokenizer(Protocol):
    """What the suites need of a tokenizer (a `tokenizers.Tokenizer` fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...): ...
    def decode(self, ids: List[int], skip_special_tokens: bool = ...) -> str: ...


def encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def filler_sentence(rng: random.Random) -> str:
    a, b = rng.sample(FILLER_ADJECTIVES, 2)
    n, m = rng.sample(FILLER_NOUNS, 2)
    return f" The {a} {n} {rng.choice(FILLER_VERBS)} the {b} {m}."


@dataclass
class Haystack:
    """Filler token ids and the offsets where a sentence starts (insertion points)."""

    ids: List[int] = field(default_factory=list)
    boundaries: List[int] = field(default_factory=list)


def haystack(tokenizer, n_tokens: int, rng: random.Random) -> Haystack:
    """Exactly `n_tokens` filler ids (the last sentence cut short); boundaries lie in [0, n_tokens]."""
    out = Haystack()
    cache = {}
    while len(out.ids) < n_tokens:
        out.boundaries.append(len(out.ids))
        sentence = filler_sentence(rng)
        if sentence not in cache:
            cache[sentence] = encode(tokenizer, sentence)
        out.ids.extend(cache[sentence])
    del out.ids[n_tokens:]
    out.boundaries.append(n_tokens)
    return out


def nearest_boundary(boundaries: Sequence[int], target: float) -> int:
    return min(boundaries, key=lambda b: (abs(b - target), b))


def insert_pieces(filler: Haystack, pieces: Sequence[List[int]], positions: Sequence[int]) -> tuple:
    """Insert token pieces at non-decreasing filler offsets; returns (ids, start of each piece)."""
    if list(positions) != sorted(positions):
        raise ValueError(f"positions {list(positions)} must be non-decreasing")
    ids: List[int] = []
    starts: List[int] = []
    last = 0
    for piece, pos in zip(pieces, positions):
        ids.extend(filler.ids[last:pos])
        starts.append(len(ids))
        ids.extend(piece)
        last = pos
    ids.extend(filler.ids[last:])
    return ids, starts
