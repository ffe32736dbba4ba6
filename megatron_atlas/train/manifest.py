"""Checksums of a checkpoint folder: `manifest.json`, written last inside the temporary folder and
verified before anything in the folder is loaded.

    {"files": {"state.pt": {"bytes": 123, "sha256": "..."}, "deepspeed/mp_rank_00_model_states.pt": ...}}

Paths are relative to the folder (posix). Only the `files` key is read, so other top-level keys
(a format version) can be added beside it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from megatron_atlas.atomic import write_text_atomic

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """Checksum every file under `folder` into `folder/manifest.json`; returns the manifest."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(folder)}
    manifest = {"files": files}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def manifest_problem(folder: Path, hashes: bool = True) -> Optional[str]:
    """What is wrong with `folder` against its manifest (None: every listed file is there with its
    size, and with `hashes` its checksum). Cheap without `hashes`: sizes only."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is damaged ({type(e).__name__}: {e})"
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {MANIFEST} says {want['bytes']:,} (truncated or replaced)"
        if hashes and file_sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}: its bytes changed after it was written"
    return None
