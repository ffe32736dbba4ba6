"""Evaluation (`python -m megatron_atlas.eval --help`): perplexity on shards and long documents,
needle in a haystack, BABILong-style qa1/qa2 and MQAR recall; results.json and a plot per run.

    lm.py          load a native checkpoint or an HF folder behind one interface
    text.py        deterministic filler text, assembled as token ids
    tasks.py       needle / BABILong example generators
    scoring.py     greedy exact match and candidate argmax
    suites.py      grids of examples per model
    perplexity.py  shard, sliding-window and streaming perplexity
    report.py      results.json and accuracy.png
"""
