"""Crash-safe file writes: write a temporary sibling, fsync it, rename it over the target.

A rename within one filesystem is atomic, so readers (and a resumed job) see either the old file or
the complete new one, never a torn write. Shared by the shard writer, prepare_data and checkpoints.

A failed write (a full disk above all) removes what it wrote, so a full disk does not stay full
because of a torn temporary, and reports `DiskFull` naming the output and the free space.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from megatron_atlas.errors import DiskFull

# ENOSPC: the device is full; EDQUOT: the user's quota is.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full_cause(error: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT error behind `error`, if any (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def _free_bytes(path: Path) -> str:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return f"{shutil.disk_usage(candidate).free / 1e6:,.1f} MB free on {candidate}"
    return "free space unknown"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def removed_on_failure(tmp: Path, what: str) -> Iterator[None]:
    """Removes `tmp` (a temporary file or folder) if the block fails; a full disk becomes DiskFull."""
    try:
        yield
    except BaseException as error:
        _remove(tmp)
        cause = disk_full_cause(error)
        if cause is not None:
            raise DiskFull(f"no space left on the device while writing {what} ({cause.strerror}); removed "
                           f"the partial {tmp}; {_free_bytes(tmp.parent)}") from error
        raise


@contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; when the block succeeds it replaces `path` durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with removed_on_failure(tmp, str(path)):
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_on_success(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_folder(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`, replacing what was there. The old folder is renamed
    aside and deleted last: `final` never holds a mix of old and new files (a crash between the two
    renames leaves the old one as `.NAME.oldPID` beside it)."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    _remove(old)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    fsync_path(final.parent)
    _remove(old)
