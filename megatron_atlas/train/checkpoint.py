"""Crash-safe checkpoints (DESIGN section 5).

Layout under `<out_dir>/checkpoints/`:

    step-00000100/state.pt    model, optimizer, RNG states, loader state, step
    step-00000100/config.yaml the resolved configuration
    latest                    the name of the newest complete checkpoint, written last

A checkpoint is written into `step-XXXXXXXX.tmp` and renamed into place only once complete (a
rename is atomic on one filesystem), then `latest` is replaced atomically. A process killed at any
moment therefore leaves either the previous checkpoint as `latest` or the new one, never half of
one; leftover `.tmp` folders are ignored and cleaned up by the next save.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional

import torch

from megatron_atlas.atomic import fsync_path, write_text_atomic

LATEST = "latest"
STATE_FILE = "state.pt"
_PREFIX = "step-"


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_file(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """A file inside the temporary checkpoint folder (the folder's rename is the atomic step)."""
    with open(path, "wb") as f:
        write(f)
    fsync_path(path)


def save_checkpoint(out_dir: Path, step: int, state: Dict[str, Any], config_yaml: str,
                    keep_last: int) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep the newest `keep_last`."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
    _write_file(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    shutil.rmtree(final, ignore_errors=True)      # a re-save of the same step after a resume
    os.rename(tmp, final)
    fsync_path(root)
    write_text_atomic(root / LATEST, name)
    _prune(root, keep_last, keep=name)
    return final


def _complete_checkpoints(root: Path) -> list:
    """Names of complete checkpoints, oldest first (temporary folders are not complete)."""
    return sorted(p.name for p in root.glob(f"{_PREFIX}*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def _prune(root: Path, keep_last: int, keep: str) -> None:
    for stale in root.glob(f"{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for name in _complete_checkpoints(root)[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


def find_latest(out_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or else the newest complete one; None if there is none."""
    root = checkpoint_dir(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = _complete_checkpoints(root) if root.is_dir() else []
    return root / complete[-1] if complete else None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (missing {STATE_FILE})")
    return torch.load(state_file, map_location="cpu", weights_only=False)
