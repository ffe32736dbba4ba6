"""The micro-batches of the coming optimizer steps, built ahead on a background thread.

`next()` returns the next step's micro-batches on the device. With `depth` > 0 a daemon thread
builds up to `depth` steps ahead (in pinned memory when the device is CUDA, so the host-to-device
copies are asynchronous); with depth 0 they are built on the calling thread. The batches are the
same either way: `build(step)` is a pure function of the step (the sources are random access).
The loader state a checkpoint stores is computed from the steps consumed (`TrainStream.state`),
never from what the thread has built, so prefetching does not move a resumed run's data.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
StepBatches = list[Batch]

_POLL_S = 0.1   # how often a blocked producer checks whether it was closed


class StepPrefetcher:
    def __init__(self, build: Callable[[int], Sequence[Batch]], steps: range, device: torch.device,
                 depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth={depth} must be >= 0")
        self.build, self.device = build, device
        self.pin = device.type == "cuda"
        self._steps = iter(steps)
        self._queue: Optional[queue.Queue] = None
        self._closed = threading.Event()
        if depth:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, args=(steps,), name="batch-prefetch",
                                            daemon=True)
            self._thread.start()

    def _host_batches(self, step: int) -> StepBatches:
        batches = [(ids, labels) for ids, labels in self.build(step)]
        if self.pin:
            batches = [(ids.pin_memory(), labels.pin_memory()) for ids, labels in batches]
        return batches

    def _produce(self, steps: range) -> None:
        for step in steps:
            try:
                item = (step, self._host_batches(step))
            except BaseException as error:   # handed to the consumer, which raises it
                item = (step, error)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set() or isinstance(item[1], BaseException):
                return

    def next(self) -> StepBatches:
        """The next step's micro-batches, on the device (copies issued non-blocking)."""
        if self._queue is None:
            batches = self._host_batches(next(self._steps))
        else:
            _, batches = self._queue.get()
            if isinstance(batches, BaseException):
                raise batches
        return [(ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                for ids, labels in batches]

    def close(self) -> None:
        """Stop the thread (it finishes the step it is building and exits)."""
        self._closed.set()
        if self._queue is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "StepPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
