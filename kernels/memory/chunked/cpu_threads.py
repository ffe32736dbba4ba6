"""Run independent pieces of a CPU computation on worker threads, one intra-op thread each.

The chunk recurrence is a long chain of small ops; parallelising each op across the cores costs a
barrier per op, and on a loaded machine a descheduled thread stalls every one of them. Splitting the
(batch, head) rows into one group per core and running each group's whole chain on its own thread
needs one join per call instead. PyTorch releases the GIL inside ops, so the threads overlap.

The workers flush subnormal numbers to zero (FTZ/DAZ: the x86 control register is per thread, so
the caller's threads are untouched). A memory whose state decays over a long sequence produces
products below the smallest normal float; they carry no information next to the O(1) terms they
join, and x86 arithmetic on them is many times slower on some processors.
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


def _flush_subnormals() -> None:
    torch.set_flush_denormal(True)   # this thread only (MXCSR); False where the CPU lacks FTZ/DAZ


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="memory-rows", initializer=_flush_subnormals)
            _pool_size = workers
        return _pool


def _on_worker(task: Callable[[], Result], threads: Optional[int]) -> Result:
    """Runs `task` with grad mode off (it is per thread; the caller records no graph either) and, when
    `threads` is given, with that many intra-op threads."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)   # this thread's OpenMP and MKL teams
    try:
        with torch.no_grad():
            return task()
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def run_all(tasks: Sequence[Callable[[], Result]], device: torch.device) -> List[Result]:
    """Each task's result, in order. On CPU they run on the flushing workers: several with one
    intra-op thread each, a single one with the caller's thread count. Elsewhere they run here (a
    CUDA stream is per thread, and the GPU has no subnormal penalty)."""
    if device.type != "cpu":
        return [task() for task in tasks]
    threads = None if len(tasks) == 1 else 1
    futures = [_executor(len(tasks)).submit(_on_worker, task, threads) for task in tasks]
    return [future.result() for future in futures]
