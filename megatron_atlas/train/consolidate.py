"""DeepSpeed checkpoints (any ZeRO stage, any TP degree) -> one full, TP-free state dict.

Per TP rank, DeepSpeed's `zero_to_fp32` reassembles the fp32 master weights from the ZeRO
partitions of that rank's DP group (stage 0 has no partitions: the saved module is the weights).
`zero_to_fp32` expects one model-parallel rank, so each rank's files are shown to it through a
folder of links renamed to `mp_rank_00`. The TP shards are then concatenated along each
parameter's `partition_dim`, recorded in the checkpoint when it was saved. The folder's manifest
and pickles are checked before DeepSpeed's code reads it (`checkpoint.load_deepspeed_state`).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch

from megatron_atlas.train import checkpoint as ckpt
from megatron_atlas.train.safe_load import load_torch_file
from megatron_atlas.parallel.sharding import gather_state_dict


def tp_rank_state_dict(ds_dir: Path, tp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """The fp32 weights one TP rank holds, gathered over its ZeRO partitions."""
    tag = f"mp_rank_{tp_rank:02d}"
    files = sorted(p for p in ds_dir.iterdir() if tag in p.name)
    if not files:
        raise FileNotFoundError(f"{ds_dir}: no files of tensor-parallel rank {tp_rank} ({tag})")
    if zero_stage == 0:
        module = load_torch_file(ds_dir / f"{tag}_model_states.pt")["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import _get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    with tempfile.TemporaryDirectory() as view:
        for f in files:
            (Path(view) / f.name.replace(tag, "mp_rank_00")).symlink_to(f.resolve())
        quiet = io.StringIO()   # zero_to_fp32 prints per-file progress
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = _get_fp32_state_dict_from_zero_checkpoint(view, exclude_frozen_parameters=False)
            state = to_torch_tensor(state)   # ZeRO-3 hands back lazily gathered tensors
    return {k: v.clone() for k, v in state.items()}


def consolidate(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full TP-free state dict, the checkpoint's trainer state); the folder is verified first."""
    state = ckpt.load_deepspeed_state(path)
    layout, keys = state["layout"], state["state_dict_keys"]
    shards = [tp_rank_state_dict(Path(path) / ckpt.DEEPSPEED_TAG, t, layout["zero_stage"])
              for t in range(layout["tp"])]
    for t, s in enumerate(shards):
        missing = sorted(set(keys) - set(s))
        if missing:
            raise ValueError(f"{path}: TP rank {t} lacks {missing[:3]} ({len(missing)} entries)")
        shards[t] = {k: s[k] for k in keys}   # the model's own state-dict keys and order
    return gather_state_dict(shards, state["partition_dims"]), state
