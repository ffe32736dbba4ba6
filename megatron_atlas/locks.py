"""Advisory locks on run and sweep folders (`fcntl.flock`), so two processes never write one folder.

    with folder_lock(out_dir, TRAIN_LOCK, "training"):   # a second trainer fails at once:
        ...                                                # LockHeld naming the holder's pid and host

The lock file holds the holder's pid, host, start time and command line (written once the lock is
taken) for the message. The kernel drops the lock when the holder exits, however it dies, so a lock
file left behind by a killed process is not a stale lock. Advisory: only processes that take the
lock are kept out. Across hosts it needs a filesystem that supports it: NFS (the Linux client maps
flock to NFS locks) and Lustre mounted with `-o flock` do; elsewhere it may lock within one host only.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from megatron_atlas.errors import LockHeld

TRAIN_LOCK = ".train.lock"     # in train.out_dir, held by rank 0 while it trains there
LAUNCH_LOCK = ".launch.lock"   # in a sweep folder (a whole-plan launch) and in each run folder it trains


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']} (since {since}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not written yet)"


@contextmanager
def folder_lock(folder: Path, name: str, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (file `folder/name`) for the block; LockHeld if taken."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"{folder} is in use for {purpose} by {_holder(path)}: wait for it to finish or "
                           f"stop it; the lock is {path}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(sys.argv) or sys.executable}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock
