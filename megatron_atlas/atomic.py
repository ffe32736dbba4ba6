"""Crash-safe file writes: write a temporary sibling, fsync it, rename it over the target.

A rename within one filesystem is atomic, so readers (and a resumed job) see either the old file or
the complete new one, never a torn write. Shared by the shard writer, prepare_data and checkpoints.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; when the block succeeds it replaces `path` durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_on_success(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
