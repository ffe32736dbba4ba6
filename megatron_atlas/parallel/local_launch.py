"""Run a function in N local gloo processes (tests, CPU benchmarks), with a deadline so a hang fails."""
from __future__ import annotations

import os
import socket
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world: int = 2, args: tuple = (), timeout_s: float = 240.0) -> None:
    """Call fn(rank, world, *args) in `world` spawned processes joined in one gloo group (fn must be
    importable by name). An exception in any worker is raised here; past `timeout_s` the workers
    are killed and TimeoutError is raised."""
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} gloo workers running {fn.__name__} did not finish in {timeout_s:.0f} s")
