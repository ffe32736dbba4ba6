"""Random-access batches from token shards (format: `data.shard_format`), resumable on any DP size.

Order: epoch `e` visits all N samples of the split in the permutation `perm(seed, e)`; the global
sample stream is epoch 0's permutation, then epoch 1's, and so on. Global batch `i` (of
`batch_size * dp_size` samples) is the stream's slice at `consumed = i * global_batch` and DP rank
`r` takes rows `[r * batch_size, (r + 1) * batch_size)` of it (a dataloader worker a contiguous
sub-slice of those). The loader state is `(seed, epoch, consumed within the epoch)`; a source built
with `start=state, start_index=k` serves batch `k` from that state onward, so a run resumed on
another DP size (same global batch) sees the same global sequence of samples.

Reading: webdataset streams tar files front to back, but random access needs each member's byte
offset, so shards are opened with `tarfile` (what webdataset reads tars with) once to locate their
members and checked against index.json, then memory-mapped; a batch is `batch_size` slices of the
maps (no per-sample parsing, no copy beyond the output tensor).
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_atlas.data.shard_format import DTYPES, TOKENIZER, read_index, sample_member


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match index.json."""


@dataclass(frozen=True)
class LoaderState:
    seed: int
    epoch: int
    consumed: int   # samples of this epoch consumed globally (over all DP ranks)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(int(d["seed"]), int(d["epoch"]), int(d["consumed"]))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) and the split's size only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Shard:
    """One tar file mapped into memory, with the byte offset of every sample's payload."""

    def __init__(self, path: Path, first_sample: int, samples: int, window: int, dtype: str) -> None:
        self.path, self.window, self.dtype = path, window, np.dtype(DTYPES[dtype])
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        offsets = _regular_offsets(raw, first_sample, samples, window * self.dtype.itemsize, dtype)
        if offsets is None:   # not the layout the writer makes: walk the headers, name what is wrong
            offsets = _scan_offsets(path, first_sample, samples, window * self.dtype.itemsize, dtype)
        self.offsets = offsets // self.dtype.itemsize
        # payloads start on 512-byte blocks, so the file reads as whole items of the token dtype
        self.data = raw[: len(raw) // self.dtype.itemsize * self.dtype.itemsize].view(self.dtype)

    def row(self, i: int) -> np.ndarray:
        o = self.offsets[i]
        return self.data[o:o + self.window]


def _regular_offsets(raw: np.ndarray, first_sample: int, samples: int, nbytes: int,
                     dtype: str) -> Optional[np.ndarray]:
    """Payload offsets if the shard is laid out as written (ustar headers of 512 bytes, each payload
    padded to 512): every member name and size is checked at once, ~100x faster than tarfile's walk
    of the headers (seconds for a shard of 100k+ short windows). None if anything differs."""
    stride = 512 + -(-nbytes // 512) * 512
    if samples == 0 or len(raw) < samples * stride:
        return None
    headers = raw[: samples * stride].reshape(samples, stride)
    names = np.array([sample_member(first_sample + k, dtype) for k in range(samples)], dtype="S100")
    if not np.array_equal(headers[:, :100], names.view(np.uint8).reshape(samples, 100)):
        return None
    size_field = headers[0, 124:136]
    if tarfile.nti(size_field.tobytes()) != nbytes or not (headers[:, 124:136] == size_field).all():
        return None
    return np.arange(samples, dtype=np.int64) * stride + 512


def _scan_offsets(path: Path, first_sample: int, samples: int, nbytes: int, dtype: str) -> np.ndarray:
    """Payload offsets by reading every tar header; raises ShardError naming the first bad sample."""
    size = path.stat().st_size
    offsets: list[int] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                offsets.append(member.offset_data)
                sample = first_sample + len(offsets) - 1
                expected = sample_member(sample, dtype)
                if member.name != expected or member.size != nbytes:
                    raise ShardError(f"shard {path}: sample {sample} is {member.name!r} of {member.size} "
                                     f"bytes, expected {expected!r} of {nbytes} (corrupt shard)")
                if member.offset_data + nbytes > size:
                    raise ShardError(f"shard {path} is truncated: sample {sample} ({expected}) is cut off")
    except tarfile.TarError as e:
        raise ShardError(f"shard {path} is corrupt or truncated near sample "
                         f"{first_sample + len(offsets)}: {e}") from None
    if len(offsets) != samples:
        raise ShardError(f"shard {path} is truncated: it holds {len(offsets)} samples, index.json says "
                         f"{samples}; sample {first_sample + len(offsets)} is the first missing")
    return np.asarray(offsets, dtype=np.int64)


class ShardSource:
    """`batch(index) -> (input_ids, labels)`, LongTensor `[batch_size, seq_len]`, for one DP rank."""

    def __init__(self, path: str | Path, split: str = "train", *, batch_size: int,
                 seq_len: Optional[int] = None, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 start: Optional[LoaderState] = None, start_index: int = 0,
                 tokenizer_sha256: Optional[str] = None) -> None:
        self.root = Path(path)
        self.index = read_index(self.root)
        if split not in self.index["splits"]:
            raise ValueError(f"{self.root}: no split {split!r} (has {', '.join(self.index['splits'])})")
        if tokenizer_sha256 and tokenizer_sha256 != self.index["tokenizer"]["sha256"]:
            raise ValueError(f"{self.root} was made with another tokenizer than {TOKENIZER} expected")
        info = self.index["splits"][split]
        self.split, self.window = split, self.index["seq_len"] + 1
        self.seq_len = seq_len or self.index["seq_len"]
        if self.seq_len > self.index["seq_len"]:
            raise ValueError(f"seq_len={self.seq_len} exceeds the shards' seq_len={self.index['seq_len']}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.shard_info = info["shards"]
        self.num_samples = sum(s["samples"] for s in self.shard_info)
        if self.num_samples == 0:
            raise ValueError(f"{self.root}: split {split!r} has no samples")
        self.starts = np.cumsum([0] + [s["samples"] for s in self.shard_info])
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        self.start = start or LoaderState(seed, 0, 0)
        self.seed, self.start_index = self.start.seed, start_index
        self._shards: dict[int, _Shard] = {}
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def _position(self, index: int) -> int:
        """Global stream position of batch `index`'s first sample."""
        base = self.start.epoch * self.num_samples + self.start.consumed
        return base + (index - self.start_index) * self.global_batch

    def state(self, index: int) -> LoaderState:
        """The state after batches `< index`: pass it as `start` (with `start_index=index`) to resume."""
        epoch, consumed = divmod(self._position(index), self.num_samples)
        return LoaderState(self.seed, epoch, consumed)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:   # one epoch's permutation cached: batches mostly stay in one epoch
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.num_samples))
        return self._perm[1]

    def sample_ids(self, index: int, worker_id: int = 0, num_workers: int = 1) -> np.ndarray:
        """Split-wide sample numbers of this rank's (and worker's) rows of batch `index`."""
        if index < self.start_index:
            raise IndexError(f"batch {index} precedes this source's start (batch {self.start_index})")
        rows = np.array_split(np.arange(self.batch_size), num_workers)[worker_id]
        positions = self._position(index) + self.dp_rank * self.batch_size + rows
        epochs, within = np.divmod(positions, self.num_samples)
        ids = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = self._permutation(int(epoch))[within[mask]]
        return ids

    def _shard(self, k: int) -> _Shard:
        if k not in self._shards:
            s = self.shard_info[k]
            self._shards[k] = _Shard(self.root / s["name"], int(self.starts[k]), s["samples"], self.window,
                                     self.index["dtype"])
        return self._shards[k]

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `seq_len + 1` ids, int64 `[len(ids), seq_len + 1]`."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for r, (sample, k) in enumerate(zip(ids.tolist(), shard_of.tolist())):
            out[r] = self._shard(k).row(sample - int(self.starts[k]))[:self.seq_len + 1]
        return out

    def batch(self, index: int, worker_id: int = 0, num_workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.windows(self.sample_ids(index, worker_id, num_workers)))
        return w[:, :-1], w[:, 1:]   # labels: the next token at every position
