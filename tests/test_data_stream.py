"""The streaming text source (data/stream.py): windows are the documents of each shard packed in
order, the shard order depends on (seed, epoch) only, DP ranks and loader workers read disjoint
shards, and a source resumed from its state continues exactly (mid-document, across shards and
epochs, with workers); it trains through `train.data.kind=webdataset`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_atlas.data.config import DataConfig, WebDatasetDataConfig
from megatron_atlas.data.sources import build_source
from megatron_atlas.data.stream import StreamingTextSource, stream_shards
from megatron_atlas.data.tokenizer import Tokenizer, train_bpe
from megatron_atlas.model.config import ConfigError
from tests.test_webdataset_text import documents, write_tar

SEQ, SHARDS = 12, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    texts = {i: [f"shard {i}: {t}" for t in documents(4 + i, 100 * i)] for i in range(SHARDS)}
    for i, t in texts.items():
        write_tar(root / f"s-{i:02d}.tar", t, as_json=i % 2 == 1)
    tok = train_bpe([t for ts in texts.values() for t in ts], vocab_size=300)
    tok.save(root / "tokenizer.json")
    return root, texts, Tokenizer.from_file(root / "tokenizer.json")


def _source(root: Path, tok, **kw) -> StreamingTextSource:
    args = dict(batch_size=3, seq_len=SEQ, seed=5)
    return StreamingTextSource([f"{root}/s-{{00..{SHARDS - 1:02d}}}.tar"], tok, **{**args, **kw})


def _expected_windows(texts, tok, shard_order):
    """Per shard: its documents + EOD, concatenated, cut into windows of SEQ + 1, tail dropped."""
    out = []
    for url in shard_order:
        i = int(Path(url).stem.split("-")[1])
        ids = np.concatenate([tok.encode_batch([t])[0] + [tok.eod_id] for t in texts[i]])
        n = len(ids) // (SEQ + 1)
        out += list(ids[:n * (SEQ + 1)].reshape(n, SEQ + 1))
    return out


def _read(source, n):
    return [source.batch(k) for k in range(n)]


def test_windows_follow_the_seeded_shard_order_and_pack_each_shard(corpus):
    root, texts, tok = corpus
    source = _source(root, tok)
    order = stream_shards(source.urls, 5, 0, 0, 1)
    assert sorted(order) == source.urls and order != source.urls       # a permutation, not the listing
    assert stream_shards(source.urls, 5, 1, 0, 1) != order              # another epoch, another order
    assert stream_shards(source.urls, 5, 0, 0, 1) == order              # a function of (seed, epoch)
    expected = _expected_windows(texts, tok, order)
    got = torch.cat([ids for ids, _ in _read(source, len(expected) // 3)])
    want = torch.tensor(np.stack(expected[:len(got)]))
    assert torch.equal(got, want[:, :-1])
    ids, labels = source.batch(len(expected) // 3)
    assert ids.shape == labels.shape == (3, SEQ)


@pytest.mark.parametrize("stop", [1, 5, 9, 23])   # mid-document, mid-shard, into the next epoch
def test_resume_from_the_state_continues_exactly(corpus, stop):
    root, _, tok = corpus
    straight = _read(_source(root, tok), stop + 4)
    first = _source(root, tok)
    _read(first, stop)
    state = first.state(stop).to_dict()
    resumed = _source(root, tok, start=state)
    for k in range(4):
        a, b = straight[stop + k], resumed.batch(k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (stop, k)
    assert resumed.state(4).to_dict()["consumed"] == stop + 4


def test_ranks_and_workers_read_disjoint_shards_and_workers_resume(corpus):
    root, texts, tok = corpus
    n_streams = 4   # dp 2 x workers 2
    per_stream = [stream_shards(_source(root, tok).urls, 5, 0, n, n_streams) for n in range(n_streams)]
    assert sorted(sum(per_stream, [])) == sorted(_source(root, tok).urls)
    rank1 = _source(root, tok, dp_rank=1, dp_size=2, workers=2)
    batches = _read(rank1, 4)
    # micro-batch k comes from worker k % 2, i.e. streams 2 and 3 in turn
    for worker in range(2):
        expected = _expected_windows(texts, tok, per_stream[2 + worker])
        got = torch.cat([batches[k][0] for k in range(worker, 4, 2)])
        assert torch.equal(got, torch.tensor(np.stack(expected[:6]))[:, :-1])
    state = rank1.state(4).to_dict()
    assert sorted(state["streams"]) == ["2", "3"] and state["layout"] == [2, 2]
    more = [rank1.batch(k) for k in (4, 5)]
    resumed = _source(root, tok, dp_rank=1, dp_size=2, workers=2, start=state)
    for k in range(2):
        assert torch.equal(resumed.batch(k)[0], more[k][0])
    with pytest.raises(ValueError, match="dp_size x workers = 2 x 2"):
        _source(root, tok, dp_rank=0, dp_size=1, start=state)


def test_config_builds_the_stream_and_names_what_is_missing(corpus, tmp_path):
    root, _, tok = corpus
    urls = [f"{root}/s-{{00..03}}.tar"]
    cfg = DataConfig(kind="webdataset", webdataset=WebDatasetDataConfig(
        urls=urls, val_urls=[f"{root}/s-05.tar"], tokenizer=str(root / "tokenizer.json")))
    cfg.validate()
    train = build_source(cfg, batch_size=2, seq_len=SEQ, model_vocab=320, seed=5, split="train")
    evaluation = build_source(cfg, batch_size=2, seq_len=SEQ, model_vocab=320, seed=1, split="eval")
    again = build_source(cfg, batch_size=2, seq_len=SEQ, model_vocab=320, seed=1, split="eval")
    assert train.batch(0)[0].shape == (2, SEQ)
    assert torch.equal(evaluation.batch(0)[0], again.batch(0)[0])
    with pytest.raises(ConfigError, match="train.data.webdataset.val_urls"):
        DataConfig(kind="webdataset", webdataset=WebDatasetDataConfig(urls=urls, tokenizer="t.json")).validate()
    with pytest.raises(ConfigError, match="more than model.vocab_size=256"):
        build_source(cfg, batch_size=2, seq_len=SEQ, model_vocab=256, seed=5, split="train")
    with pytest.raises(ValueError, match="in order"):
        train.batch(5)


def test_training_runs_on_the_stream_and_resumes(corpus, tmp_path):
    from megatron_atlas.configs import compose, to_model_config, to_train_config
    from megatron_atlas.train.loop import train

    root, _, _ = corpus
    common = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=320",
              "train.seq_len=12", "train.micro_batch_size=2", "train.steps=4", "train.eval_every=2",
              "train.data.eval_batches=1", "train.tensorboard=false", "train.warmup_steps=1",
              "train.data.kind=webdataset", f"train.data.webdataset.urls=['{root}/s-{{00..04}}.tar']",
              f"train.data.webdataset.val_urls=['{root}/s-05.tar']",
              f"train.data.webdataset.tokenizer={root / 'tokenizer.json'}"]

    def run(out, *extra):
        cfg = compose("transformer", "tiny", "tiny", common + [f"train.out_dir={out}", *extra])
        return train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None)["losses"]

    straight = run(tmp_path / "a")
    run(tmp_path / "b", "train.exit_at_step=2", "train.save_every=2")
    resumed = run(tmp_path / "b", "train.resume=auto")
    assert len(straight) == 4 and len(set(straight)) == 4
    assert resumed == pytest.approx(straight[2:], abs=1e-6)


def _two_ranks(rank: int, world: int, root: str) -> None:
    tok = Tokenizer.from_file(Path(root) / "tokenizer.json")
    source = _source(Path(root), tok, dp_rank=rank, dp_size=world)
    mine = _read(source, 3)
    state = source.state(3).to_dict()   # every rank asks at the same step, as the training loop does
    assert sorted(state["streams"]) == ["0", "1"], state
    again = [source.batch(k) for k in (3, 4)]
    # any rank's copy of the state (rank 0's is the one saved) resumes this rank exactly
    resumed = _source(Path(root), tok, dp_rank=rank, dp_size=world, start=state)
    for k in range(2):
        assert torch.equal(resumed.batch(k)[0], again[k][0])
    assert not torch.equal(mine[0][0], _read(_source(Path(root), tok, dp_rank=1 - rank, dp_size=world), 1)[0][0])


def test_the_state_holds_every_ranks_streams(corpus):
    from megatron_atlas.parallel.local_launch import run_local

    root, _, _ = corpus
    run_local(_two_ranks, world=2, args=(str(root),), timeout_s=180)
