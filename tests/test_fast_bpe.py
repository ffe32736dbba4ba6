"""The tiktoken fast path of prepare_data gives the tokenizer's own ids, or steps aside."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

from megatron_atlas.data import fast_bpe
from megatron_atlas.data.documents import expand_inputs
from megatron_atlas.data.fast_bpe import FastByteLevelEncoder
from megatron_atlas.data.prepare import PrepareArgs, prepare
from megatron_atlas.data.tokenizer import Tokenizer, train_bpe


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    """Code, prose, digits, whitespace runs, contractions, non-Latin scripts, emoji and control bytes."""
    rng = np.random.default_rng(seed)
    pieces = ["def f(x):\n    return x ** 2\n", "It's a test; we'll see.", "  \t\n\n   ", "12345 67.89",
              "Grüße aus Köln", "Привет мир", "東京タワー", "🙂🚀", "\x00\x07\x1b", "a_b-c+d=e",
              "ATLAS'll memorise", "    indented\n\tline", "<|endoftext|>", "x" * 50, "http://a.b/c?d=e"]
    return ["".join(rng.choice(pieces, size=int(rng.integers(1, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(_texts(200, seed=1), vocab_size=600)


def test_fast_encoder_equals_tokenizer_on_varied_text(tokenizer):
    encoder = FastByteLevelEncoder(tokenizer, check_every=10 ** 9)   # check only the first document
    assert encoder.active, encoder.fallback_reason
    texts = _texts(400, seed=2)
    assert encoder.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert encoder.mismatched_batches == 0


def test_a_document_with_the_special_token_text_goes_through_the_tokenizer(tokenizer):
    encoder = FastByteLevelEncoder(tokenizer, check_every=10 ** 9)
    ids = encoder.encode_batch(["plain", "before<|endoftext|>after"])[1]
    assert tokenizer.eod_id in ids


def test_a_disagreement_is_caught_and_the_batch_reencoded(tokenizer, monkeypatch):
    encoder = FastByteLevelEncoder(tokenizer, check_every=2)
    real = encoder.encoding.encode_ordinary_batch
    monkeypatch.setattr(encoder.encoding, "encode_ordinary_batch",
                        lambda texts, num_threads: [ids + [1] for ids in real(texts, num_threads=num_threads)],
                        raising=False)
    texts = _texts(10, seed=3)
    assert encoder.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert encoder.mismatched_batches == 1


def test_tokenizers_tiktoken_cannot_reproduce_keep_the_slow_path(tokenizer):
    small = train_bpe(_texts(50), vocab_size=120)   # not every byte in the vocabulary
    assert not FastByteLevelEncoder(small).active
    assert "every byte" in FastByteLevelEncoder(small).fallback_reason
    hf = HFTokenizer.from_str(tokenizer.to_json())
    hf.normalizer = normalizers.Lowercase()
    lowercasing = Tokenizer(hf)
    encoder = FastByteLevelEncoder(lowercasing)
    assert not encoder.active
    texts = _texts(20, seed=4)
    assert encoder.encode_batch(texts) == lowercasing.encode_batch(texts)


def test_prepare_writes_the_same_shards_with_and_without_the_fast_path(tmp_path, monkeypatch):
    folder = tmp_path / "text"
    folder.mkdir()
    for i, text in enumerate(_texts(120, seed=5)):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    settings = dict(seq_len=32, vocab_size=600, val_fraction=0.2, seed=3, samples_per_shard=20, workers=1)
    logs: list[str] = []
    prepare(PrepareArgs(out_dir=str(tmp_path / "fast"), **settings), expand_inputs([folder]), log=logs.append)
    assert any("tiktoken" in line for line in logs)

    monkeypatch.setattr(fast_bpe, "_mergeable_ranks", lambda spec: None)   # force the slow path
    prepare(PrepareArgs(out_dir=str(tmp_path / "slow"), **settings), expand_inputs([folder]), log=logs.append)
    assert any("tokenizers library" in line for line in logs)

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.iterdir())}
    assert files(tmp_path / "fast") == files(tmp_path / "slow")
