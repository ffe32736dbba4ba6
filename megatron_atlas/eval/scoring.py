"""Scoring one prompt/answer example.

Two scores per example, from one cached read of the prompt:
  exact      the greedy continuation of len(answer_ids) tokens equals the answer's ids
  candidate  the answer has the highest total log-probability among the example's candidates
             (only when it lists candidates; None otherwise)
Needle-in-a-haystack reports `exact` (the needle must be reproduced), BABILong `candidate` (choose
the place among all places; chance is 1/6), as is usual for those benchmarks.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_atlas.eval.lm import EvalLM
from megatron_atlas.eval.tasks import Example


def _continuation_logprob(lm: EvalLM, last_logits: torch.Tensor, state, ids: List[int]) -> float:
    total = float(torch.log_softmax(last_logits.float(), -1)[ids[0]])
    if len(ids) > 1:
        logits = lm.extend(lm.copy_state(state), torch.tensor([ids[:-1]]))[0]
        logp = torch.log_softmax(logits.float(), -1)
        total += float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    return total


@torch.no_grad()
def score_example(lm: EvalLM, example: Example) -> Dict[str, Optional[object]]:
    logits, state = lm.prefill(torch.tensor([example.prompt]))
    last = logits[0, -1]
    candidate = None
    if example.candidates:
        scores = {c: _continuation_logprob(lm, last, state, lm.encode(c)) for c in example.candidates}
        candidate = max(scores, key=scores.get) == example.answer
    generated: List[int] = []
    for _ in range(len(example.answer_ids)):
        token = int(last.argmax())
        generated.append(token)
        last = lm.extend(state, torch.tensor([[token]]))[0, -1]
    return {"exact": generated == example.answer_ids, "candidate": candidate,
            "generated": lm.tokenizer.decode(generated)}
