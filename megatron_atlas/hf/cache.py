"""`AtlasCache`: the native recurrent cache behind `generate`, with left padding and beam reordering.

Padding never enters the model. The memory reads every token it is given, and inside a memory
chunk all inner gradients are taken at the chunk-start weights, so a padded row could only equal
its unpadded run if its real tokens started on a chunk boundary and every pad left the state
untouched. Instead the rows of a left-padded batch are grouped by their pad count: each group runs
its real tokens, unpadded and batched, through its own native cache, so every row computes exactly
what it computes alone (the cost is one batched step per distinct prompt length). Beam search
reorders rows with `reorder_cache`, which carries every row's cache (memory state, open chunk,
short-conv tail, KV window) along with it.

This file is vendored into exported folders (see vendor.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from megatron_atlas.model.lm import LMCache


def select_rows(obj: Any, index: Tensor) -> Any:
    """A copy of a (nested) native cache keeping batch rows `index`, in that order."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: select_rows(getattr(obj, f.name), index)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: select_rows(v, index) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(select_rows(v, index) for v in obj)
    return obj


def left_pad_counts(attention_mask: Optional[Tensor], shape: torch.Size, allow_right: bool) -> Tensor:
    """Per-row count of leading zeros of `attention_mask` [B, T] (zeros if None). Each row must be
    zeros then ones (then, with `allow_right`, zeros again: a causal model's real positions do
    not see right padding)."""
    batch, length = shape
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(batch, length)}")
    mask = attention_mask.to("cpu", torch.bool)
    if bool(mask.all()):
        return torch.zeros(batch, dtype=torch.long)
    real = mask.sum(1)
    first = torch.where(real > 0, mask.long().argmax(1), torch.full_like(real, length))
    column = torch.arange(length)
    contiguous = (mask == ((column >= first[:, None]) & (column < (first + real)[:, None]))).all(1)
    right = first + real < length
    bad = (real == 0) | ~contiguous | (right & (not allow_right))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        if real[row] == 0:
            raise ValueError(f"attention_mask row {row} is all zeros: nothing to read")
        what = "has holes" if not contiguous[row] else "is right-padded"
        raise ValueError(f"attention_mask row {row} {what} ({mask[row].int().tolist()}); pass left-padded "
                         "rows (tokenizer padding_side='left'): the recurrent memory must not read pads")
    return first


@dataclasses.dataclass
class _Group:
    rows: Tensor        # batch rows of this group, in the order of its cache rows
    cache: LMCache


class AtlasCache:
    """Native caches for groups of rows that share a left-pad count, and the columns consumed."""

    def __init__(self) -> None:
        self.groups: List[_Group] = []
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Row j of the batch continues from the cache of row beam_idx[j] (beam search)."""
        beam_idx = beam_idx.to("cpu", torch.long)
        groups = []
        for group in self.groups:
            local = {int(r): i for i, r in enumerate(group.rows)}
            rows = [j for j, source in enumerate(beam_idx.tolist()) if source in local]
            if rows:
                picks = torch.tensor([local[int(beam_idx[j])] for j in rows])
                groups.append(_Group(torch.tensor(rows), select_rows(group.cache, picks)))
        self.groups = groups

    def step(self, step: Callable[[Tensor, LMCache], Tensor], new_cache: Callable[[int], LMCache],
             input_ids: Tensor, pads: Tensor) -> Tensor:
        """Logits [B, T, V] of the next columns; rows read only their real tokens (pad columns get
        zero logits). `pads` (first call only) are the rows' left-pad counts."""
        if not self.groups:
            for pad in sorted(set(pads.tolist())):
                rows = (pads == pad).nonzero().flatten()
                self.groups.append(_Group(rows, new_cache(len(rows))))
        elif bool(pads.any()):
            raise ValueError("only the first forward of a cached sequence may hold padding")
        logits = None
        for group in self.groups:
            pad = int(pads[group.rows[0]])
            out = step(input_ids[group.rows.to(input_ids.device), pad:], group.cache)
            if logits is None:
                logits = out.new_zeros(input_ids.shape[0], input_ids.shape[1], out.shape[-1])
            logits[group.rows.to(out.device), pad:] = out
        self.seen_tokens += input_ids.shape[1]
        return logits
