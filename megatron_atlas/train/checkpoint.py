"""Crash-safe checkpoints (DESIGN section 5).

Layout under `<out_dir>/checkpoints/`:

    step-00000100/state.pt    model, optimizer, RNG states, loader state, step
    step-00000100/config.yaml the resolved configuration
    latest                    the name of the newest complete checkpoint, written last

A DeepSpeed run writes instead (every rank its part, into the same temporary folder):

    step-00000100/deepspeed/        the engine's files (mp_rank_XX_model_states.pt, ZeRO partitions)
    step-00000100/rng/rank-NNNNN.pt each rank's RNG states
    step-00000100/trainer_state.pt  step, loader state, layout (tp, dp, zero stage), TP partition dims
    step-00000100/config.yaml

`tools/checkpoint_tool.py consolidate` turns that into the first layout (state.pt with the full,
TP-free model), which `load_checkpoint` reads.

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
DEEPSPEED_STATE_FILE = "trainer_state.pt"
DEEPSPEED_TAG = "deepspeed"
RNG_DIR = "rng"
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
    tmp = fresh_temporary_dir(out_dir, step)
    _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
    return publish_checkpoint(tmp, config_yaml, keep_last)


def temporary_dir(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place."""
    return checkpoint_dir(out_dir) / f"{_PREFIX}{step:08d}.tmp"


def fresh_temporary_dir(out_dir: Path, step: int) -> Path:
    """An empty `step-XXXXXXXX.tmp` under the checkpoint root (a torn earlier attempt is removed)."""
    checkpoint_dir(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, config_yaml: str, keep_last: int) -> Path:
    """Complete a checkpoint written into `tmp`: config, rename into place, `latest` last, prune."""
    root, name = tmp.parent, tmp.name[:-len(".tmp")]
    final = root / name
    _write_file(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
    shutil.rmtree(final, ignore_errors=True)      # a re-save of the same step after a resume
    os.rename(tmp, final)
    fsync_path(root)
    write_text_atomic(root / LATEST, name)
    _prune(root, keep_last, keep=name)
    return final


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or (path / DEEPSPEED_STATE_FILE).is_file()


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (Path(path) / DEEPSPEED_STATE_FILE).is_file()


def write_rank_rng(tmp: Path, rank: int) -> None:
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    _write_file(tmp / RNG_DIR / f"rank-{rank:05d}.pt", lambda f: torch.save(rng_state(), f))


def load_rank_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG states if the checkpoint has them (same world size); True if it did."""
    file = Path(path) / RNG_DIR / f"rank-{rank:05d}.pt"
    if file.is_file():
        set_rng_state(torch.load(file, map_location="cpu", weights_only=False))
    return file.is_file()


def _complete_checkpoints(root: Path) -> list:
    """Names of complete checkpoints, oldest first (temporary folders are not complete)."""
    return sorted(p.name for p in root.glob(f"{_PREFIX}*")
                  if p.is_dir() and not p.name.endswith(".tmp") and is_complete(p))


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
        if is_complete(named):
            return named
    complete = _complete_checkpoints(root) if root.is_dir() else []
    return root / complete[-1] if complete else None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """The state dict of a native (or consolidated) checkpoint: step, model (full, TP-free), ..."""
    state_file = Path(path) / STATE_FILE
    if is_deepspeed_checkpoint(path) and not state_file.is_file():
        raise FileNotFoundError(f"{path} is a DeepSpeed checkpoint; make a full state dict of it with "
                                f"`python tools/checkpoint_tool.py consolidate {path} OUT_DIR`")
    if not state_file.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (missing {STATE_FILE})")
    return torch.load(state_file, map_location="cpu", weights_only=False)
