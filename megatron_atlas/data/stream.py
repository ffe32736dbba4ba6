"""Training straight from webdataset shards of raw text, tokenized on the fly, for corpora too large
to pre-tokenize (the reading side is wds_text.py: local, pipe: and http(s):// URLs, brace patterns).

Streams. Every (DP rank r, loader worker w) is one stream n = r * workers + w of N = dp_size *
workers. In epoch e the shard list is permuted by (seed, e) and stream n reads the shards at
positions n, n + N, n + 2N, ... of that order, so streams read disjoint shards and the order depends
on (seed, epoch) only. A stream that runs out of shards goes on with its shards of epoch e + 1.

Windows. Inside a shard the documents (each followed by the end-of-document id) are packed into
consecutive windows of seq_len + 1 ids; what is left at the end of a shard is dropped, so a shard's
windows do not depend on the shards before it.

Position and resume. A stream's position is (epoch, shard: index in its list, doc: documents
consumed in that shard, token: ids of that document already in earlier windows); resuming re-opens
that shard, skips `doc` documents without tokenizing them, and continues exactly. Micro-batch k of
a rank holds `batch_size` windows of its worker k % workers (what a DataLoader over the streams
does). The loader state stores every stream's position (gathered over the ranks when `state` is
asked for), plus the layout (dp_size, workers) it is valid for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_atlas.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    shard: int = 0
    doc: int = 0
    token: int = 0


def stream_shards(urls: Sequence[str], seed: int, epoch: int, stream: int, n_streams: int) -> List[str]:
    """Stream `stream`'s shards in epoch `epoch`: every n_streams-th of the (seed, epoch) permutation."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in order[stream::n_streams]]


def stream_windows(urls: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int, stream: int,
                   n_streams: int, start: Position = Position(), text_field: str = "text"
                   ) -> Iterator[Tuple[np.ndarray, Position]]:
    """(window of seq_len + 1 ids, position after it) for one stream, forever, from `start`."""
    from collections import Counter

    from megatron_atlas.data.wds_text import shard_documents

    if len(urls) < n_streams:
        raise ValueError(f"{len(urls)} shards cannot feed {n_streams} streams (dp_size x workers): every "
                         "stream needs a shard of its own")
    width = seq_len + 1
    epoch, first_shard, skip_docs, skip_tokens = start.epoch, start.shard, start.doc, start.token
    while True:
        shards = stream_shards(urls, seed, epoch, stream, n_streams)
        for s in range(first_shard, len(shards)):
            pending: List[list] = []   # [doc index, ids, first unused id]
            count = 0
            for d, text in enumerate(shard_documents(shards[s], text_field, Counter())):
                if d < skip_docs or not text.strip():
                    continue
                ids = np.asarray(tokenizer.encode_batch([text])[0] + [tokenizer.eod_id], dtype=np.int64)
                first = skip_tokens if d == skip_docs else 0
                pending.append([d, ids, first])
                count += len(ids) - first
                while count >= width:
                    window, need = [], width
                    while need:
                        piece = pending[0]
                        take = min(need, len(piece[1]) - piece[2])
                        window.append(piece[1][piece[2]:piece[2] + take])
                        piece[2] += take
                        need -= take
                        if piece[2] == len(piece[1]):
                            pending.pop(0)
                    count -= width
                    doc, token = (pending[0][0], pending[0][2]) if pending else (d + 1, 0)
                    yield np.concatenate(window), Position(epoch, s, doc, token)
            skip_docs = skip_tokens = 0
        epoch, first_shard = epoch + 1, 0


class _Streams(torch.utils.data.IterableDataset):
    """This rank's streams; in a DataLoader worker w, stream dp_rank * workers + w."""

    def __init__(self, source: "StreamingTextSource") -> None:
        super().__init__()
        self.source = source

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n = self.source.stream_index(0 if info is None else info.id)
        for window, position in self.source.windows(n):
            yield torch.from_numpy(window), n, torch.tensor([position.epoch, position.shard,
                                                             position.doc, position.token])


class StreamingTextSource:
    """`batch(k)` (k = 0, 1, 2, ... in order) -> (input_ids, labels) [batch_size, seq_len] of this rank;
    `state(k)`: the loader state after micro-batches < k (k = the next batch to read)."""

    def __init__(self, urls: Sequence[str], tokenizer: Tokenizer, *, batch_size: int, seq_len: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, workers: int = 0, text_field: str = "text",
                 start: Optional[dict] = None) -> None:
        from megatron_atlas.data.wds_text import expand_urls

        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError("no shard URLs given")
        self.tokenizer, self.batch_size, self.seq_len, self.seed = tokenizer, batch_size, seq_len, seed
        self.dp_rank, self.dp_size, self.workers, self.text_field = dp_rank, dp_size, workers, text_field
        self.positions: Dict[int, Position] = {}
        self.start = dict(start or {})
        if "streams" in self.start:
            layout = list(self.start["layout"])
            if layout != [dp_size, max(1, workers)]:
                raise ValueError(f"the loader state was written for dp_size x workers = {layout[0]} x {layout[1]}; "
                                 f"this run has {dp_size} x {max(1, workers)}: the streams' shards differ")
            self.positions = {int(n): Position(*p) for n, p in self.start["streams"].items()}
        self._next, self._iterator = 0, None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def stream_index(self, worker: int) -> int:
        return self.dp_rank * max(1, self.workers) + worker

    def windows(self, n: int) -> Iterator[Tuple[np.ndarray, Position]]:
        return stream_windows(self.urls, self.tokenizer, self.seq_len, self.seed, n,
                              self.dp_size * max(1, self.workers), self.positions.get(n, Position()),
                              self.text_field)

    def _batches(self):
        if self.workers == 0:   # in this process: one stream, batches of consecutive windows
            n = self.stream_index(0)
            windows = self.windows(n)
            while True:
                rows = [next(windows) for _ in range(self.batch_size)]
                yield torch.from_numpy(np.stack([w for w, _ in rows])), n, rows[-1][1]
        loader = torch.utils.data.DataLoader(_Streams(self), batch_size=self.batch_size, num_workers=self.workers)
        for ids, streams, positions in loader:
            yield ids, int(streams[-1]), Position(*positions[-1].tolist())

    def batch(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if index != self._next:
            raise ValueError(f"a streaming source reads its batches in order: asked for batch {index}, "
                             f"the next one is {self._next}")
        if self._iterator is None:
            self._iterator = self._batches()
        ids, stream, position = next(self._iterator)
        self.positions[stream] = position
        self._next += 1
        return ids[:, :-1], ids[:, 1:]   # labels: the next token at every position

    def state(self, index: int) -> "StreamState":
        if index != self._next:
            raise ValueError(f"the state is known after the batches read so far ({self._next}), not {index}")
        done = int(self.start.get("consumed", 0)) + index
        return StreamState(self.seed, done, self.dp_size, max(1, self.workers), self._all_positions())

    def _all_positions(self) -> Dict[int, Position]:
        """Every rank's stream positions, so that the state rank 0 saves resumes every rank. The
        training loop asks every rank for the state at the same step: a collective is safe there."""
        import torch.distributed as dist

        positions = dict(self.positions)
        if self.dp_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, positions)
            for other in gathered:   # TP ranks of one DP rank hold the same streams: same values
                positions.update(other)
        return positions


@dataclass
class StreamState:
    seed: int
    batches: int                      # micro-batches this rank read, resumed runs included
    dp_size: int
    workers: int
    streams: Dict[int, Position]

    def to_dict(self) -> dict:
        # epoch/consumed: the keys every loader state has (the train loop reads them); positions per stream
        return {"seed": self.seed, "epoch": 0, "consumed": self.batches, "layout": [self.dp_size, self.workers],
                "streams": {str(n): [p.epoch, p.shard, p.doc, p.token] for n, p in sorted(self.streams.items())}}
