"""Checks before training starts that need more than the config files: the machine, the launch
and the checkpoint to resume. Each failure is a ConfigError naming the key, so the command line
prints a message instead of a traceback from deep inside the model or the loader.

    preflight(model_cfg, train_cfg, parallel_cfg)       device, TP layout, train.resume
    out_of_memory_message(error, model_cfg, train_cfg)   the message for an allocation failure
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_atlas.model.config import ConfigError, ModelConfig
from megatron_atlas.train.config import ParallelConfig, TrainConfig


def check_device(cfg: TrainConfig) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is "
                          f"False; torch {torch.__version__}, CUDA build {torch.version.cuda}); use "
                          "train.device=cpu or auto")


def check_layout(model_cfg: ModelConfig, pcfg: ParallelConfig) -> None:
    """The TP degree must split the heads, vocabulary and FFN (the model would raise on every rank)."""
    from megatron_atlas.model import resolve_ffn_hidden
    from megatron_atlas.model.lm import check_tensor_parallel
    from megatron_atlas.parallel.state import ParallelConfigError
    try:
        check_tensor_parallel(resolve_ffn_hidden(model_cfg), pcfg.tp)
    except ParallelConfigError as e:
        raise ConfigError(f"parallel.tp={pcfg.tp}: {e}") from None


def check_resume(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """A named checkpoint must exist; the one resumed must be of this model."""
    from megatron_atlas.train.checkpoint import find_latest, is_complete
    from megatron_atlas.train.resume import check_model_matches
    if cfg.resume == "none":
        return
    if cfg.resume == "auto":
        path = find_latest(Path(cfg.out_dir))
    else:
        path = Path(cfg.resume)
        if not path.exists():
            raise ConfigError(f"train.resume={path}: no such checkpoint folder (give a step-XXXXXXXX folder, "
                              "auto or none)")
        if not is_complete(path):
            raise ConfigError(f"train.resume={path} is not a checkpoint folder (no state.pt or trainer_state.pt)")
    if path is not None:
        check_model_matches(path, model_cfg)


def preflight(model_cfg: ModelConfig, cfg: TrainConfig, pcfg: ParallelConfig) -> None:
    check_device(cfg)
    check_layout(model_cfg, pcfg)
    check_resume(model_cfg, cfg)


def out_of_memory_message(error: BaseException, model_cfg: ModelConfig, cfg: TrainConfig) -> Optional[str]:
    """A message naming the settings that size memory when `error` is an allocation failure; else None."""
    text = str(error)
    oom = isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))
    if not oom:
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    mem = model_cfg.memory
    return (f"out of memory ({first}). What sizes it: train.micro_batch_size={cfg.micro_batch_size}, "
            f"train.seq_len={cfg.seq_len}, model.d_model={model_cfg.d_model}, model.n_layers={model_cfg.n_layers}, "
            f"model.vocab_size={model_cfg.vocab_size}, model.memory.degree={mem.degree} (key width "
            f"{model_cfg.mem_key_dim}), model.memory.chunk={mem.chunk}; lower one of them, or set "
            "parallel.activation_checkpointing=true")
