"""Crash-safe checkpoints (DESIGN section 5).

Layout under `<out_dir>/checkpoints/`:

    step-00000100/state.pt    model, optimizer, RNG states, loader state, step
    step-00000100/config.yaml the resolved configuration
    step-00000100/manifest.json  size and sha256 of every file above (train/manifest.py)
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
one; leftover `.tmp` folders are ignored and cleaned up by the next save. A save that fails (a full
disk) removes its `.tmp` folder at once.

Integrity (docs/reliability.md): a save refuses state holding NaN/inf; every checkpoint carries a
manifest of checksums, verified before it is loaded (`verify_checkpoint`); files are unpickled with
`weights_only=True` (train/safe_load.py), DeepSpeed folders only after their pickles are checked;
loaded state is checked for NaN/inf and negative second moments; retention (`keep_last`) counts
only checkpoints that verify, so it never deletes the last good one.
"""
from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional

import torch

from megatron_atlas.atomic import fsync_path, removed_on_failure, write_text_atomic
from megatron_atlas.errors import CheckpointError, CheckpointNotFound, NonFiniteState
from megatron_atlas.train.finite import bad_state_entries
from megatron_atlas.train.manifest import has_manifest, manifest_problem, write_manifest
from megatron_atlas.train.safe_load import check_pickles, load_torch_file

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
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep the newest `keep_last`.
    Raises NonFiniteState (writing nothing) when the state holds NaN/inf."""
    bad = bad_state_entries(state)
    if bad:
        raise NonFiniteState(f"not writing the checkpoint of step {step}: {', '.join(bad)}; "
                             f"the checkpoints in {checkpoint_dir(out_dir)} are left as they are")
    tmp = fresh_temporary_dir(out_dir, step)
    with removed_on_failure(tmp, f"the checkpoint of step {step}"):
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
    with removed_on_failure(tmp, f"checkpoint {final}"):
        _write_file(tmp / "config.yaml", lambda f: f.write(config_yaml.encode()))
        write_manifest(tmp)   # last inside the folder: it covers every file, other ranks' too
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
        set_rng_state(load_torch_file(file))
    return file.is_file()


def complete_checkpoints(root: Path) -> list:
    """Names of complete checkpoints, oldest first (temporary folders are not complete)."""
    return sorted(p.name for p in root.glob(f"{_PREFIX}*")
                  if p.is_dir() and not p.name.endswith(".tmp") and is_complete(p))


def remove_torn_temporaries(out_dir: Path) -> list[str]:
    """Delete `step-*.tmp` folders (saves that were killed or failed); returns their names. Only
    safe while no other process writes checkpoints here (the run folder's lock)."""
    root = checkpoint_dir(out_dir)
    torn = sorted(p.name for p in root.glob(f"{_PREFIX}*.tmp")) if root.is_dir() else []
    for name in torn:
        shutil.rmtree(root / name, ignore_errors=True)
    return torn


def retained(names: list[str], keep_last: int, is_good: Callable[[str], bool]) -> list[str]:
    """The checkpoints (names, oldest first) to delete so that the newest `keep_last` good ones stay.
    Only good checkpoints count, and nothing newer than the oldest kept good one is deleted, so the
    last good checkpoint always survives (and damaged ones newer than it stay for inspection)."""
    if keep_last <= 0:
        return []
    good = 0
    for i in range(len(names) - 1, -1, -1):
        good += is_good(names[i])
        if good == keep_last:
            return names[:i]
    return []   # fewer good ones than keep_last: keep everything


def _prune(root: Path, keep_last: int, keep: str) -> None:
    remove_torn_temporaries(root.parent)
    names = complete_checkpoints(root)
    for name in retained(names, keep_last, lambda n: verify_checkpoint(root / n, hashes=False) is None):
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
    complete = complete_checkpoints(root) if root.is_dir() else []
    return root / complete[-1] if complete else None


def _zip_problem(path: Path) -> Optional[str]:
    """A torch file is a zip archive with a CRC per member: enough to find a torn or flipped file
    in checkpoints written before manifests."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:   # damaged headers
        return f"{path.name} is not a complete torch file ({e})"
    return f"{path.name}: member {bad} fails its CRC check" if bad else None


def verify_checkpoint(path: Path, hashes: bool = True) -> Optional[str]:
    """None when the checkpoint at `path` is complete and intact, else what is wrong with it.

    With a manifest: every file's size (and, with `hashes`, its sha256). Without one (written
    before manifests): the zip CRCs of its torch files."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a checkpoint folder"
    if not is_complete(path):
        return f"neither {STATE_FILE} nor {DEEPSPEED_STATE_FILE} is in {path}"
    if has_manifest(path):
        return manifest_problem(path, hashes)
    if not hashes:
        return None
    for file in sorted(path.rglob("*.pt")):
        problem = _zip_problem(file)
        if problem:
            return problem
    return None


def _verified(path: Path) -> None:
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def check_loaded_state(state: Dict[str, Any], path: Path) -> None:
    """Refuse a loaded state whose weights or optimizer moments are NaN/inf (or negative second moments)."""
    bad = bad_state_entries({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        raise CheckpointError(f"checkpoint {path} holds unusable values: {', '.join(bad)}; an update "
                              "from it would write NaN into the weights")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """The state dict of a native (or consolidated) checkpoint: step, model (full, TP-free), ...,
    after its manifest verified and its values checked."""
    path = Path(path)
    state_file = path / STATE_FILE
    if is_deepspeed_checkpoint(path) and not state_file.is_file():
        raise CheckpointNotFound(f"{path} is a DeepSpeed checkpoint; make a full state dict of it with "
                                 f"`python tools/checkpoint_tool.py consolidate {path} OUT_DIR`")
    if not state_file.is_file():
        raise CheckpointNotFound(f"no checkpoint at {path} (missing {STATE_FILE})")
    _verified(path)
    state = load_torch_file(state_file)
    check_loaded_state(state, path)
    return state


def load_deepspeed_state(path: Path) -> Dict[str, Any]:
    """`trainer_state.pt` of a DeepSpeed checkpoint, once the folder verified and every pickle in it
    was found to import nothing but tensors and DeepSpeed's plain records: DeepSpeed then unpickles
    the folder's files itself (with weights_only=False)."""
    path = Path(path)
    if not is_deepspeed_checkpoint(path):
        raise CheckpointNotFound(f"{path} is not a DeepSpeed checkpoint of this project (no {DEEPSPEED_STATE_FILE})")
    _verified(path)
    check_pickles(path)
    return load_torch_file(path / DEEPSPEED_STATE_FILE)
