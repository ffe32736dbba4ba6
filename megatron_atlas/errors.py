"""Faults in what a run reads or writes, reported as a message rather than a traceback.

A `FaultError` names the file (checkpoint, shard, lock) and what is wrong with it; the command-line
entry points print it and exit 1. Bad configuration values stay `ConfigError` (model/config.py).
"""
from __future__ import annotations


class FaultError(Exception):
    """A damaged, missing or busy input or output; the message names it and what to do."""


class CheckpointError(FaultError):
    """A checkpoint that is missing, damaged, unsafe to unpickle or unusable by this run."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint (of the kind asked for) at a path; also a FileNotFoundError for older callers."""


class DiskFull(FaultError):
    """A write failed because the device is full (the partial output was removed)."""


class LockHeld(FaultError):
    """Another process holds the lock of a run or sweep folder."""


class NonFiniteState(FaultError, FloatingPointError):
    """Weights or optimizer state hold NaN/inf: nothing is saved from them."""
