"""Run independent pieces of a CPU computation on worker threads, one intra-op thread each.

The chunk recurrence is a long chain of small ops; parallelising each op across the cores costs a
barrier per op, and on a loaded machine a descheduled thread stalls every one of them. Splitting the
(batch, head) rows into one group per core and running each group's whole chain on its own thread
needs one join per call instead. PyTorch releases the GIL inside ops, so the threads overlap.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

Result = TypeVar("Result")

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def row_groups(rows: int, device: torch.device) -> List[slice]:
    """Contiguous groups of `rows`, one per intra-op thread on CPU (a single group elsewhere)."""
    parts = min(rows, torch.get_num_threads()) if device.type == "cpu" else 1
    bounds = [rows * i // max(parts, 1) for i in range(max(parts, 1) + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="memory-rows"), workers
        return _pool


def _single_threaded(task: Callable[[], Result]) -> Result:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # this thread's OpenMP and MKL teams
    try:
        with torch.no_grad():  # grad mode is per thread; the caller records no graph either
            return task()
    finally:
        torch.set_num_threads(threads)


def run_all(tasks: Sequence[Callable[[], Result]]) -> List[Result]:
    """Each task's result, in order; several tasks run on worker threads, one runs here."""
    if len(tasks) == 1:
        return [tasks[0]()]
    futures = [_executor(len(tasks)).submit(_single_threaded, task) for task in tasks]
    return [future.result() for future in futures]
