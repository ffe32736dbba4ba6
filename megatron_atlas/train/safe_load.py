"""Loading torch files without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a crafted checkpoint runs code on
load. Everything this project writes (model and optimizer state dicts, RNG states, loader and
trainer states) is tensors and plain containers, which `weights_only=True` accepts as they are.

DeepSpeed's own checkpoint files also pickle a few DeepSpeed classes, and DeepSpeed loads them with
`weights_only=False` itself. Before such a folder is handed to DeepSpeed, `check_pickles` lists the
globals every `.pt` file in it would import (without unpickling anything) and refuses the folder
unless they are torch's safe set plus the plain DeepSpeed records in DEEPSPEED_GLOBALS.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from megatron_atlas.errors import CheckpointError, CheckpointNotFound

# Plain records DeepSpeed pickles into its optimizer-state files (loss scaler, ZeRO stage, the
# address of a parameter fragment): reconstructing them sets attributes and runs nothing else.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})

_DAMAGED = (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(get_unsafe_globals_in_checkpoint(str(path)))
    except _DAMAGED + (pickle.UnpicklingError,) as e:
        raise CheckpointError(f"{path} is damaged or not a torch file ({type(e).__name__}: {e})") from None


def _refusal(path: Path, names: Iterable[str]) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: it pickles {', '.join(sorted(names))}, not only tensors and plain "
        "containers, and unpickling that could run code. Files this project writes never do: this "
        "one was written by another program or tampered with")


def load_torch_file(path: Path) -> Any:
    """`torch.load` on the CPU that unpickles tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = _unsafe_globals(path)
        if names:
            raise _refusal(path, names) from None
        raise CheckpointError(f"{path} is damaged: its pickled data cannot be read") from None
    except _DAMAGED as e:
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: {e})") from None


def check_pickles(folder: Path, allowed: frozenset[str] = DEEPSPEED_GLOBALS) -> None:
    """Refuse `folder` if any `.pt` file in it would import a global outside torch's safe set and
    `allowed` when unpickled (checked on the pickle opcodes: nothing is loaded or run)."""
    for path in sorted(Path(folder).rglob("*.pt")):
        names = set(_unsafe_globals(path)) - allowed
        if names:
            raise _refusal(path, names)
