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

Integrity: a shard's size is checked against index.json when it is opened and each sample's CRC-32
against the shard's checksum file the first time the sample is read; token ids outside the
vocabulary are caught in every batch. Each ShardError names the shard and the sample.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_atlas.data.shard_format import DTYPES, TOKENIZER, payload_crc32, read_index, sample_member
from megatron_atlas.errors import FaultError


class ShardError(FaultError, RuntimeError):
    """A shard is missing, truncated, corrupt or does not match index.json; names shard and sample."""


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
    """One tar file mapped into memory, with the byte offset of every sample's payload, and each
    sample's checksum when index.json names a checksum file (`entry`: the shard's index entry)."""

    def __init__(self, path: Path, first_sample: int, samples: int, window: int, dtype: str,
                 entry: Optional[dict] = None) -> None:
        self.path, self.window, self.dtype = path, window, np.dtype(DTYPES[dtype])
        self.first_sample, self.member_dtype = first_sample, dtype
        entry = entry or {}
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise ShardError(self._size_problem(size, entry["bytes"], samples))
        self.crc32 = self._checksums(path.with_name(entry["crc32"]), samples) if "crc32" in entry else None
        self.checked = np.zeros(samples, dtype=bool)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        offsets = _regular_offsets(raw, first_sample, samples, window * self.dtype.itemsize, dtype)
        if offsets is None:   # not the layout the writer makes: walk the headers, name what is wrong
            offsets = _scan_offsets(path, first_sample, samples, window * self.dtype.itemsize, dtype)
        self.offsets = offsets // self.dtype.itemsize
        # payloads start on 512-byte blocks, so the file reads as whole items of the token dtype
        self.data = raw[: len(raw) // self.dtype.itemsize * self.dtype.itemsize].view(self.dtype)

    def _size_problem(self, size: int, expected: int, samples: int) -> str:
        said = f"shard {self.path} has {size:,} bytes, index.json says {expected:,}"
        if size > expected:
            return f"{said}: it was replaced or appended to"
        # the writer's layout: sample j's payload ends at j * stride + 512 + payload bytes
        nbytes = self.window * self.dtype.itemsize
        stride = 512 + -(-nbytes // 512) * 512
        cut = min(samples - 1, max(0, (size - 512 - nbytes) // stride + 1))
        return f"{said}: truncated, {self.describe(cut)} is the first cut off"

    def _checksums(self, path: Path, samples: int) -> np.ndarray:
        if not path.is_file():
            raise ShardError(f"the checksum file {path} of shard {self.path} is missing")
        crc32 = np.fromfile(path, dtype="<u4")
        if len(crc32) != samples:
            raise ShardError(f"the checksum file {path} holds {len(crc32)} checksums; shard {self.path} has "
                             f"{samples} samples (a damaged checksum file)")
        return crc32

    def describe(self, i: int) -> str:
        sample = self.first_sample + i
        return f"shard {self.path}, sample {sample} ({sample_member(sample, self.member_dtype)})"

    def row(self, i: int) -> np.ndarray:
        o = self.offsets[i]
        window = self.data[o:o + self.window]
        if self.crc32 is not None and not self.checked[i]:   # once per sample and process
            if payload_crc32(window) != self.crc32[i]:
                raise ShardError(f"{self.describe(i)} does not match its checksum: the shard's bytes changed "
                                 "after it was written (corrupt shard; re-run tools/prepare_data.py)")
            self.checked[i] = True
        return window


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
                                     self.index["dtype"], s)
        return self._shards[k]

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `seq_len + 1` ids, int64 `[len(ids), seq_len + 1]`; ShardError on an id outside
        the vocabulary (which would otherwise fail later in the embedding, naming nothing)."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for r, (sample, k) in enumerate(zip(ids.tolist(), shard_of.tolist())):
            out[r] = self._shard(k).row(sample - int(self.starts[k]))[:self.seq_len + 1]
        if out.size and out.max() >= self.vocab_size:
            r = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            k = int(shard_of[r])
            raise ShardError(f"{self._shard(k).describe(int(ids[r]) - int(self.starts[k]))} holds token id "
                             f"{int(out[r].max())}, outside the {self.vocab_size} ids of {self.root / 'index.json'} "
                             "(corrupt shard)")
        return out

    def batch(self, index: int, worker_id: int = 0, num_workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.windows(self.sample_ids(index, worker_id, num_workers)))
        return w[:, :-1], w[:, 1:]   # labels: the next token at every position
