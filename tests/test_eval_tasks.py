"""The long-context generators: deterministic from the seed, exact prompt lengths, the needle / facts
really in the prompt at the stated place, and answers that follow from the facts."""
from __future__ import annotations

import re

import pytest

from megatron_atlas.eval.tasks import (NEEDLE_KINDS, PLACES, babilong_example, needle_example)
from megatron_atlas.eval.text import encode
from megatron_atlas.hf.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
LONGEST_FILLER_SENTENCE = 80     # bytes; a needle lands on the sentence boundary nearest its depth


def _text(ids) -> str:
    return TOK.decode(ids)


def test_byte_tokenizer_is_identity_on_bytes():
    text = "héllo, wörld\n\t~"
    ids = encode(TOK, text)
    assert ids == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text and TOK.get_vocab_size() == 256


@pytest.mark.parametrize("kind", NEEDLE_KINDS)
@pytest.mark.parametrize("length", [512, 1024, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_length_depth_and_answer(kind, length, depth):
    ex = needle_example(TOK, length, depth, kind, seed=5, index=2)
    assert len(ex.prompt) == length
    value = ex.meta["value"]
    needle = encode(TOK, f" The secret {kind} is {value}.")
    start = ex.evidence["needle"]
    assert ex.prompt[start:start + len(needle)] == needle
    room = length - len(needle) - len(encode(TOK, f"\nWhat is the secret {kind}? The secret {kind} is"))
    assert abs(start - depth * room) <= LONGEST_FILLER_SENTENCE
    text = _text(ex.prompt)
    assert text.count(value) == 1                       # only the needle holds the answer
    assert text.endswith(f"The secret {kind} is") and ex.answer == f" {value}"
    assert ex.answer_ids == encode(TOK, ex.answer)
    pattern = {"number": r"\d{7}", "word": r"[a-z]+", "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"}
    assert re.fullmatch(pattern[kind], value)


def test_generators_are_deterministic_and_seeded():
    a = needle_example(TOK, 800, 0.5, "uuid", seed=1, index=0)
    assert a.prompt == needle_example(TOK, 800, 0.5, "uuid", seed=1, index=0).prompt
    assert a.prompt != needle_example(TOK, 800, 0.5, "uuid", seed=2, index=0).prompt
    assert a.prompt != needle_example(TOK, 800, 0.5, "uuid", seed=1, index=1).prompt
    b = babilong_example(TOK, 900, "qa2", seed=3, index=4)
    assert b.prompt == babilong_example(TOK, 900, "qa2", seed=3, index=4).prompt
    assert b.prompt != babilong_example(TOK, 900, "qa2", seed=4, index=4).prompt


def _replay(facts, obj=None):
    """Independent reading of the facts: people's last places, and who holds what."""
    where, holder = {}, {}
    for fact in facts:
        move = re.fullmatch(r"(\w+) (?:went|moved|travelled|journeyed) to the (\w+)", fact)
        pick = re.fullmatch(r"(\w+) picked up the (\w+)", fact)
        assert move or pick, fact
        if move:
            where[move.group(1)] = move.group(2)
        else:
            holder[pick.group(2)] = pick.group(1)
    return where, holder


@pytest.mark.parametrize("task", ["qa1", "qa2"])
@pytest.mark.parametrize("length", [400, 2048])
@pytest.mark.parametrize("index", range(4))
def test_babilong_facts_in_prompt_and_answer_follows(task, length, index):
    ex = babilong_example(TOK, length, task, seed=11, index=index, n_facts=5)
    assert len(ex.prompt) == length
    facts = ex.meta["facts"]
    starts = [ex.evidence[f"fact{i}"] for i in range(len(facts))]
    assert starts == sorted(starts)
    for fact, start in zip(facts, starts):
        piece = encode(TOK, f" {fact}.")
        assert ex.prompt[start:start + len(piece)] == piece
    where, holder = _replay(facts)
    question = _text(ex.prompt).rsplit("\n", 1)[1]
    if task == "qa1":
        person = re.match(r"Where is (\w+)\?", question).group(1)
        expected = where[person]
    else:
        obj = re.match(r"Where is the (\w+)\?", question).group(1)
        expected = where[holder[obj]]
    assert ex.answer == f" {expected}" and expected in PLACES
    assert ex.answer in ex.candidates and len(ex.candidates) == len(PLACES)


def test_too_short_prompts_are_refused():
    with pytest.raises(ValueError, match="length=20"):
        needle_example(TOK, 20, 0.5, "uuid", seed=0)
    with pytest.raises(ValueError, match="kind"):
        needle_example(TOK, 500, 0.5, "color", seed=0)
