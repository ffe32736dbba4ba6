"""What data a run trains on, recorded in every checkpoint (in the loader state) and checked on resume.

    data_identity(source, kind) -> {"kind": ..., "tokenizer_sha256": ..., "shards_sha256": ..., ...}
    check_identity(recorded, current, allow)   ConfigError when a resume would switch data

Shards: the tokenizer's sha256 (from index.json) and a digest of the split's shard list (names,
sample counts and each shard's sha256 where index.json has it). Webdataset text: the tokenizer's
sha256 and a digest of the URL list. MQAR: only the kind (the data are generated from the config).
Checkpoints written before identities were recorded resume without the check.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from megatron_atlas.model.config import ConfigError

OVERRIDE_KEY = "train.data.allow_data_change"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def data_identity(source: Any, kind: str) -> dict:
    """The identity of the training data `source` (a built batch source of `kind`) reads."""
    if kind == "shards":
        index, split = source.index, source.split
        shards = [[s["name"], s["samples"], s.get("sha256")] for s in index["splits"][split]["shards"]]
        return {"kind": kind, "tokenizer_sha256": index["tokenizer"]["sha256"], "split": split,
                "seq_len": index["seq_len"], "samples": source.num_samples, "shards_sha256": _digest(shards)}
    if kind == "webdataset":
        return {"kind": kind, "tokenizer_sha256": source.tokenizer.sha256, "urls_sha256": _digest(source.urls),
                "urls": len(source.urls)}
    return {"kind": kind}


def check_identity(recorded: Optional[dict], current: dict, allow: bool) -> None:
    """Refuse to resume a checkpoint written on other data, unless `allow` (the override key)."""
    if recorded is None or allow or recorded == current:
        return
    differ = [f"{key} {recorded.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(recorded) | set(current))
              if recorded.get(key) != current.get(key)]
    hint = (" (another tokenizer: the token ids mean other things)"
            if recorded.get("tokenizer_sha256") != current.get("tokenizer_sha256") else "")
    raise ConfigError(f"the checkpoint was trained on other data than this run reads: {'; '.join(differ)}{hint}. "
                      f"Resume with the same train.data settings, or set {OVERRIDE_KEY}=true to continue on "
                      "these data anyway")
