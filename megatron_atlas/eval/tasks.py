"""Long-context tasks generated offline, deterministic from a seed: needle in a haystack and
BABILong-style fact chaining (qa1, qa2) hidden in filler text.

Every example is a prompt of exactly `length` token ids that ends with a question whose answer the
model should continue with; the answer is text encoded by the model's tokenizer, so a byte-level
256-id model works as well as a BPE one. `candidates` (when not empty) are the possible answers
for argmax scoring. Difficulty knobs: length, needle depth, needle kind, number of facts.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from megatron_atlas.eval.text import encode, haystack, insert_pieces, nearest_boundary

NEEDLE_KINDS = ("number", "word", "uuid")
NEEDLE_WORDS = ("apricot", "falcon", "tangerine", "walrus", "saxophone", "pelican", "zucchini",
                "marmalade", "octopus", "kangaroo", "porcupine", "avocado", "flamingo", "cinnamon")
NAMES = ("Mary", "John", "Sandra", "Daniel", "Julie", "Fred", "Bill", "Emma")
PLACES = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway")
OBJECTS = ("apple", "football", "milk", "book", "key")
MOVES = ("went to", "moved to", "travelled to", "journeyed to")


@dataclass
class Example:
    task: str
    length: int                       # prompt length in tokens (exact)
    prompt: List[int]
    answer: str                       # the continuation expected after the prompt
    answer_ids: List[int]
    candidates: List[str] = field(default_factory=list)
    evidence: Dict[str, int] = field(default_factory=dict)   # piece name -> token offset in prompt
    meta: Dict[str, object] = field(default_factory=dict)


def _example_rng(seed: int, *key) -> random.Random:
    return random.Random(f"{seed}/" + "/".join(map(str, key)))


def needle_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return rng.choice(NEEDLE_WORDS)
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle kind={kind!r}; choose one of {', '.join(NEEDLE_KINDS)}")


def needle_example(tokenizer, length: int, depth: float, kind: str, seed: int, index: int = 0) -> Example:
    """One needle sentence at relative `depth` (0 = start, 1 = end of the haystack)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    rng = _example_rng(seed, "niah", length, depth, kind, index)
    value = needle_value(kind, rng)
    needle = encode(tokenizer, f" The secret {kind} is {value}.")
    question = encode(tokenizer, f"\nWhat is the secret {kind}? The secret {kind} is")
    answer = f" {value}"
    room = length - len(needle) - len(question)
    if room < 1:
        raise ValueError(f"length={length} is too short for a {kind} needle and its question")
    filler = haystack(tokenizer, room, rng)
    position = nearest_boundary(filler.boundaries, depth * room)
    body, (start,) = insert_pieces(filler, [needle], [position])
    prompt = body + question
    candidates = []
    if kind == "word":
        candidates = [f" {w}" for w in NEEDLE_WORDS]
    return Example("niah", length, prompt, answer, encode(tokenizer, answer), candidates,
                   {"needle": start}, {"kind": kind, "depth": depth, "value": value})


def _spread(filler, n: int, rng: random.Random) -> List[int]:
    """`n` sorted insertion points spread over the haystack (one per equal share, jittered)."""
    bounds = filler.boundaries
    total = bounds[-1]
    return sorted(nearest_boundary(bounds, total * (i + rng.random()) / n) for i in range(n))


def babilong_example(tokenizer, length: int, task: str, seed: int, index: int = 0,
                     n_facts: int = 4) -> Example:
    """qa1: where is a person after several moves; qa2: where is the object a person carries."""
    rng = _example_rng(seed, task, length, n_facts, index)
    people = rng.sample(NAMES, 3)
    if task == "qa1":
        facts, where = _qa1_facts(people, n_facts, rng)
        target = people[0]
        question, candidates_of = f"\nWhere is {target}? Answer: {target} is in the", where[target]
    elif task == "qa2":
        facts, target, candidates_of = _qa2_facts(people, n_facts, rng)
        question = f"\nWhere is the {target}? Answer: the {target} is in the"
    else:
        raise ValueError(f"babilong task={task!r}; choose qa1 or qa2")
    pieces = [encode(tokenizer, f" {fact}.") for fact in facts]
    tail = encode(tokenizer, question)
    room = length - sum(map(len, pieces)) - len(tail)
    if room < len(pieces):
        raise ValueError(f"length={length} is too short for {len(pieces)} facts and the question")
    filler = haystack(tokenizer, room, rng)
    body, starts = insert_pieces(filler, pieces, _spread(filler, len(pieces), rng))
    answer = f" {candidates_of}"
    return Example(task, length, body + tail, answer, encode(tokenizer, answer), [f" {p}" for p in PLACES],
                   {f"fact{i}": s for i, s in enumerate(starts)}, {"facts": facts, "n_facts": n_facts})


def _qa1_facts(people: Sequence[str], n_facts: int, rng: random.Random):
    """Moves of a few people; the queried person (people[0]) moves at least once."""
    where: Dict[str, str] = {}
    facts = []
    movers = [people[0]] + [rng.choice(people) for _ in range(max(0, n_facts - 1))]
    rng.shuffle(movers)
    for person in movers:
        place = rng.choice([p for p in PLACES if p != where.get(person)])
        where[person] = place
        facts.append(f"{person} {rng.choice(MOVES)} the {place}")
    return facts, where


def _qa2_facts(people: Sequence[str], n_facts: int, rng: random.Random):
    """A person picks up an object; people move; the object is where its holder went last."""
    holder, obj = people[0], rng.choice(OBJECTS)
    events = [("pick", holder, obj), ("move", holder, None)]
    events += [("move", rng.choice(people), None) for _ in range(max(0, n_facts - 2))]
    first = events[:1]
    rest = events[1:]
    rng.shuffle(rest)
    order = first + rest if rng.random() < 0.5 else rest[:1] + first + rest[1:]
    where: Dict[str, str] = {}
    facts = []
    for kind, person, thing in order:
        if kind == "pick":
            facts.append(f"{person} picked up the {thing}")
        else:
            place = rng.choice([p for p in PLACES if p != where.get(person)])
            where[person] = place
            facts.append(f"{person} {rng.choice(MOVES)} the {place}")
    return facts, obj, where[holder]
