"""Count the host reads of tensors (`.item()`, `.cpu()`, `bool(t)`, ...: syncs on a GPU) that the
project's own code issues, by the file and line that issued them."""
from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _issuer() -> str | None:
    """file:line of the code that read the tensor, if it is this repository's (reads inside torch
    or DeepSpeed are theirs: e.g. the CPU-side step counters of torch's AdamW)."""
    frame = sys._getframe(2)   # 0: this function, 1: the patched method, 2: its caller
    if not frame.f_code.co_filename.startswith(str(REPO)):
        return None
    return f"{Path(frame.f_code.co_filename).relative_to(REPO)}:{frame.f_lineno}"


@contextlib.contextmanager
def count_host_reads() -> Iterator[collections.Counter]:
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            where = _issuer()
            if where is not None:
                counts[where] += 1
            return original(self, *args, **kwargs)
        return read
    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
