"""Token shards: prepare_data output, bad-input accounting, loader order, resume and corruption."""
from __future__ import annotations

import json
from collections import Counter
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_atlas.data.config import DataConfig, ShardsDataConfig
from megatron_atlas.data.documents import BadInputError, expand_inputs, iter_documents
from megatron_atlas.data.prepare import PrepareArgs, prepare
from megatron_atlas.data.shard_format import DTYPES, read_index
from megatron_atlas.data.shards import LoaderState, ShardError, ShardSource
from megatron_atlas.data.sources import build_source
from megatron_atlas.model.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SEQ = 16
WORDS = "alpha beta gamma delta memory atlas titan token shard window epoch batch".split()


def _corpus(folder: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(20, 80)))
        (folder / f"doc{d:03d}.txt").write_text(" ".join(words) + "\n")
    return folder


def _prepare(files_from: Path, out: Path, **kw) -> dict:
    settings = dict(seq_len=SEQ, vocab_size=300, val_fraction=0.2, seed=1, samples_per_shard=25, workers=1)
    args = PrepareArgs(out_dir=str(out), **{**settings, **kw})
    return prepare(args, expand_inputs([files_from]), log=lambda line: None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("shards")
    out = base / "out"
    _prepare(_corpus(base / "text"), out)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_deterministic_and_rerun_does_not_duplicate(shards, tmp_path):
    text = shards.parent / "text"
    other = tmp_path / "other"
    _prepare(text, other, workers=2)   # other worker count, same bytes
    assert _files(other) == _files(shards)
    index = read_index(shards)
    assert len(index["splits"]["train"]["shards"]) >= 3 and index["splits"]["val"]["samples"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    _prepare(text, other)   # complete: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == before
    # Interrupted run: index.json (written last) and the last shard are missing.
    (other / "index.json").unlink()
    last = index["splits"]["train"]["shards"][-1]["name"]
    (other / last).unlink()
    _prepare(text, other)
    assert _files(other) == _files(shards)
    # Another job into the same folder is refused rather than mixed in.
    with pytest.raises(ValueError, match="different job"):
        _prepare(text, other, seed=2)


def test_index_counts_match_shards_read_with_webdataset(shards):
    import webdataset as wds

    index = read_index(shards)
    dtype = DTYPES[index["dtype"]]
    for split, info in index["splits"].items():
        total = 0
        for shard in info["shards"]:
            samples = list(wds.WebDataset(str(shards / shard["name"]), shardshuffle=False))
            assert len(samples) == shard["samples"]
            tokens = [np.frombuffer(s["tokens.u16"], dtype=dtype) for s in samples]
            assert all(len(t) == SEQ + 1 for t in tokens) and sum(map(len, tokens)) == shard["tokens"]
            assert all(s["__key__"].startswith("sample-") for s in samples)
            total += shard["samples"]
        assert total == info["samples"] and info["tokens"] == total * (SEQ + 1)
    assert index["seq_len"] == SEQ and index["dtype"] == "uint16" and index["vocab_size"] == 300
    assert len(index["tokenizer"]["sha256"]) == 64


def test_bad_inputs_are_counted(tmp_path):
    src = tmp_path / "in"
    _corpus(src, n_docs=10)
    (src / "latin1.txt").write_bytes(b"caf\xe9 au lait " * 20)
    (src / "empty.txt").write_text("  \n")
    lines = [{"text": "a jsonl document " * 10}, {"body": "no text field"}, {"text": ""}, {"text": 3}]
    (src / "docs.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{not json\n")
    index = _prepare(src, tmp_path / "out")
    assert index["skipped"] == {"non_utf8": 1, "empty": 2, "missing_field": 2, "bad_json": 1, "bad_files": 0,
                                "no_text_member": 0, "not_regular": 0, "outside_tree": 0}
    assert index["input"]["documents"] == 10 + 1 + 1

    missing = tmp_path / "gone.txt"
    args = PrepareArgs(out_dir=str(tmp_path / "o2"), seq_len=SEQ, vocab_size=300, workers=1)
    with pytest.raises(BadInputError, match="gone.txt"):
        prepare(args, expand_inputs([src]) + [missing], log=lambda line: None)
    args = PrepareArgs(out_dir=str(tmp_path / "o3"), seq_len=SEQ, vocab_size=300, workers=1,
                       skip_bad_files=True)
    assert prepare(args, expand_inputs([src]) + [missing], log=lambda line: None)["skipped"]["bad_files"] == 1


def test_parquet_is_read_with_missing_texts_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ["first document", None, "second document", ""]
    pq.write_table(pa.table({"body": texts, "id": [1, 2, 3, 4]}), tmp_path / "x.parquet")
    counts: Counter = Counter()
    docs = list(iter_documents([tmp_path / "x.parquet"], counts, text_field="body"))
    assert docs == ["first document", "second document"]
    assert (counts["missing_field"], counts["empty"], counts["files"]) == (1, 1, 1)
    with pytest.raises(BadInputError, match="no column 'text'"):
        list(iter_documents([tmp_path / "x.parquet"], Counter()))


def test_corrupt_parquet_and_missing_pyarrow_are_named(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BadInputError, match="x.parquet.*not a readable Parquet file"):
        list(iter_documents([tmp_path / "x.parquet"], Counter()))
    counts: Counter = Counter()
    assert list(iter_documents([tmp_path / "x.parquet"], counts, skip_bad_files=True)) == []
    assert counts["bad_files"] == 1
    monkeypatch.setitem(sys.modules, "pyarrow", None)   # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    args = PrepareArgs(out_dir=str(tmp_path / "o"), seq_len=SEQ, vocab_size=300, workers=1)
    with pytest.raises(BadInputError, match="pyarrow"):
        prepare(args, [tmp_path / "x.parquet"], log=lambda line: None)


def _global_stream(path: Path, index: int, dp_size: int, batch_size: int, **kw) -> np.ndarray:
    ranks = [ShardSource(path, batch_size=batch_size, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    return np.concatenate([r.sample_ids(index) for r in ranks])


@pytest.mark.parametrize("dp_size", [2, 3])
def test_every_sample_once_per_epoch_across_ranks(shards, dp_size):
    n = ShardSource(shards, batch_size=1).num_samples
    batch_size = 2
    steps = -(-2 * n // (batch_size * dp_size))   # two epochs
    stream = np.concatenate([_global_stream(shards, i, dp_size, batch_size, seed=5) for i in range(steps)])
    for epoch in range(2):
        seen = stream[epoch * n:(epoch + 1) * n]
        assert sorted(seen.tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])   # each epoch its own order
    # dataloader workers split a rank's rows disjointly
    source = ShardSource(shards, batch_size=5, seed=5)
    parts = [source.sample_ids(3, worker_id=w, num_workers=2) for w in range(2)]
    assert np.array_equal(np.concatenate(parts), source.sample_ids(3))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_resume_mid_epoch_gives_the_same_remaining_batches(shards, dp_size):
    global_batch = 6
    ref = ShardSource(shards, batch_size=global_batch, seed=7)
    stop = ref.num_samples // global_batch - 1   # the next batches cross into epoch 1
    state = LoaderState.from_dict(json.loads(json.dumps(ref.state(stop).to_dict())))
    assert state.epoch == 0 and state.consumed == stop * global_batch
    for index in range(stop, stop + 4):
        expected = ref.batch(index)
        ranks = [ShardSource(shards, batch_size=global_batch // dp_size, dp_rank=r, dp_size=dp_size,
                             start=state, start_index=stop) for r in range(dp_size)]
        got = [r.batch(index) for r in ranks]
        assert torch.equal(torch.cat([g[0] for g in got]), expected[0])
        assert torch.equal(torch.cat([g[1] for g in got]), expected[1])
    assert ref.state(stop + 4).epoch == 1


def test_batches_are_windows_shifted_by_one(shards):
    source = ShardSource(shards, batch_size=4, seq_len=12)
    x, y = source.batch(0)
    assert x.shape == y.shape == (4, 12) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < source.vocab_size


def test_truncated_shard_raises_naming_it(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    name = read_index(broken)["splits"]["train"]["shards"][1]["name"]
    path = broken / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    source = ShardSource(broken, batch_size=8)
    with pytest.raises(ShardError, match=rf"{name}.*sample \d+"):
        for i in range(source.num_samples // 8 + 1):
            source.batch(i)


def test_build_source_reads_train_and_val_splits(shards):
    cfg = DataConfig(kind="shards", shards=ShardsDataConfig(path=str(shards)))
    cfg.validate()
    kw = dict(batch_size=2, seq_len=SEQ, model_vocab=300)
    train = build_source(cfg, seed=0, split="train", **kw)
    val = build_source(cfg, seed=cfg.eval_seed, split="eval", **kw)
    assert train.split == "train" and val.split == "val"
    assert train.batch(0)[0].shape == (2, SEQ)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_source(cfg, seed=0, split="train", batch_size=2, seq_len=SEQ, model_vocab=256)
    with pytest.raises(ConfigError, match="path"):
        DataConfig(kind="shards").validate()


def test_prepare_data_cli_help_and_run(tmp_path):
    tool = str(ROOT / "tools" / "prepare_data.py")
    assert "--val-fraction" in subprocess.run([sys.executable, tool, "--help"], capture_output=True,
                                              text=True, check=True).stdout
    src = _corpus(tmp_path / "in", n_docs=5)
    run = subprocess.run([sys.executable, tool, "--out", str(tmp_path / "o"), str(src), "--seq-len", "8",
                          "--vocab-size", "280", "--workers", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "MB/s" in run.stderr and (tmp_path / "o" / "index.json").is_file()


def test_corrupt_header_raises_naming_shard_and_sample(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    info = read_index(broken)["splits"]["train"]["shards"][0]
    path = broken / info["name"]
    data = bytearray(path.read_bytes())
    stride = 512 + 512   # one header block + one payload block of (SEQ + 1) * 2 bytes
    data[3 * stride] ^= 0xFF   # first byte of sample 3's member name
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{info['name']}.*sample 3"):
        ShardSource(broken, batch_size=1).windows(np.array([0]))


def test_fast_offsets_match_tarfile_walk(shards):
    from megatron_atlas.data.shards import _regular_offsets, _scan_offsets

    info = read_index(shards)["splits"]["val"]["shards"][0]
    path, nbytes = shards / info["name"], (SEQ + 1) * 2
    fast = _regular_offsets(np.memmap(path, dtype=np.uint8, mode="r"), 0, info["samples"], nbytes, "uint16")
    assert fast is not None and np.array_equal(fast, _scan_offsets(path, 0, info["samples"], nbytes, "uint16"))
