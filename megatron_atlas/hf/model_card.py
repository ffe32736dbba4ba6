"""The model card (README.md) of an exported folder: what the model is, how far it was trained,
how it scored, and how to load it. Facts come from the run's config and, when the checkpoint sits
in a run folder, from that run's metrics.jsonl (tokens trained, the last evaluation)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_atlas.model import ModelConfig


@dataclass
class TrainingFacts:
    step: Optional[int] = None
    tokens: Optional[int] = None             # tokens trained, from the run's metrics
    evaluation: Dict[str, Any] = field(default_factory=dict)   # the last eval record up to `step`


def read_training_facts(run_dir: Optional[Path], step: Optional[int]) -> TrainingFacts:
    """Tokens trained and the last evaluation up to `step`, from RUN/metrics.jsonl if there is one."""
    facts = TrainingFacts(step=step)
    metrics = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if metrics is None or not metrics.is_file():
        return facts
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a run killed mid-write leaves a torn last line
            continue
        if step is not None and record.get("step", 0) > step:
            continue
        if record.get("kind") == "train" and "tokens" in record:
            facts.tokens = int(record["tokens"])
        elif record.get("kind") == "eval":
            facts.evaluation = {k: v for k, v in record.items() if k != "kind"}
    return facts


def _count(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def model_card(cfg: ModelConfig, n_params: int, train: Optional[dict], facts: TrainingFacts,
               trained_length: Optional[int], special: Dict[str, Any]) -> str:
    train = train or {}
    data = train.get("data") or {}
    rows = [("preset", cfg.preset), ("block", cfg.block), ("parameters", f"{_count(n_params)} ({n_params:,})"),
            ("layers x width x heads", f"{cfg.n_layers} x {cfg.d_model} x {cfg.n_heads}"),
            ("vocabulary", cfg.vocab_size), ("trained sequence length", trained_length or "unknown"),
            ("training step", facts.step if facts.step is not None else "unknown"),
            ("tokens trained", _count(facts.tokens)), ("training data", data.get("kind", "unknown"))]
    if cfg.has_memory:
        mem = cfg.memory
        rows.insert(2, ("memory", f"{mem.kind}, rule {mem.rule}, loss {mem.loss}, window {mem.window}, "
                                  f"chunk {mem.chunk}, degree {mem.degree}"))
    if cfg.has_attention and cfg.block != "attn":
        rows.insert(3, ("attention", f"sliding window {cfg.attention.window}"))
    rows += [(name, value) for name, value in special.items() if value is not None]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if facts.evaluation:
        evaluation = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                               for k, v in facts.evaluation.items())
        evaluation = f"Last evaluation of the run (held-out batches):\n\n| metric | value |\n|---|---|\n{evaluation}"
    else:
        evaluation = "No evaluation numbers were recorded with this checkpoint."
    return f"""---
library_name: transformers
tags: [megatron-atlas, {cfg.preset}, test-time-memory]
---
# {cfg.preset} ({_count(n_params)} parameters)

A causal language model trained with megatron-atlas (block `{cfg.block}`).

| | |
|---|---|
{table}

{evaluation}

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH, padding_side="left")
batch = tok(["The secret number is", "Once"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=20, do_sample=False)
```

The model code is in this folder (`trust_remote_code`); it does not need megatron-atlas installed.
Generation carries a recurrent cache of constant size; left-padded rows give the outputs of their
unpadded selves. `max_position_embeddings` is the trained sequence length: the model runs longer
inputs, but perplexity evaluations should use windows of at most this length.
"""
