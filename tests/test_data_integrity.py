"""Shard integrity (per-sample checksums, token-id range, sizes), the data identity checked on
resume, and prepare_data's handling of odd inputs, edited inputs, damaged outputs, long lines and
invalid UTF-8."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_atlas.data.documents import BadInputError, expand_inputs
from megatron_atlas.data.identity import check_identity
from megatron_atlas.data.shard_format import read_index
from megatron_atlas.data.shards import ShardError, ShardSource
from megatron_atlas.model.config import ConfigError
from tests.test_data_shards import SEQ, _corpus, _prepare, shards  # noqa: F401 (shards: a fixture)

REPO = Path(__file__).resolve().parent.parent


def _copy(shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    return broken, read_index(broken)["splits"]["train"]["shards"][0]


def _read_all(path: Path) -> None:
    source = ShardSource(path, batch_size=1)
    source.windows(np.arange(source.num_samples))


def test_index_records_sizes_sha256_and_per_sample_checksums(shards):
    entry = read_index(shards)["splits"]["train"]["shards"][0]
    assert entry["bytes"] == (shards / entry["name"]).stat().st_size and len(entry["sha256"]) == 64
    crc = np.fromfile(shards / entry["crc32"], dtype="<u4")
    assert len(crc) == entry["samples"]
    _read_all(shards)


def test_scrambled_token_bytes_are_caught_naming_shard_and_sample(shards, tmp_path):
    broken, entry = _copy(shards, tmp_path)
    path = broken / entry["name"]
    data = bytearray(path.read_bytes())
    payload = 2 * 1024 + 512               # sample 2's payload (header and payload blocks of 512)
    data[payload:payload + 4] = data[payload + 2:payload + 4] + data[payload:payload + 2]   # two ids swapped
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{entry['name']}, sample 2 \(sample-00000002.tokens.u16\) does not "
                                         "match its checksum"):
        _read_all(broken)


def test_out_of_range_ids_are_named_even_without_checksums(shards, tmp_path):
    broken, entry = _copy(shards, tmp_path)
    index = json.loads((broken / "index.json").read_text())
    for e in index["splits"]["train"]["shards"]:   # a folder written before checksums
        for key in ("bytes", "sha256", "crc32"):
            e.pop(key)
    (broken / "index.json").write_text(json.dumps(index))
    path = broken / entry["name"]
    data = bytearray(path.read_bytes())
    data[5 * 1024 + 512 + 6:5 * 1024 + 512 + 8] = (60000).to_bytes(2, "little")   # sample 5, id 3
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"sample 5 \(sample-00000005.tokens.u16\) holds token id 60000, outside "
                                         r"the 300 ids"):
        _read_all(broken)


def test_missing_checksum_file_and_wrong_size_are_named(shards, tmp_path):
    broken, entry = _copy(shards, tmp_path)
    (broken / entry["crc32"]).unlink()
    with pytest.raises(ShardError, match=rf"checksum file .*{entry['crc32']} of shard .* is missing"):
        _read_all(broken)
    broken2, entry = _copy(shards, tmp_path / "2")
    with (broken2 / entry["name"]).open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="index.json says .* replaced or appended"):
        _read_all(broken2)


def test_training_on_a_corrupt_shard_stops_with_a_message(shards, tmp_path, capsys):
    from megatron_atlas.train.__main__ import main
    broken, entry = _copy(shards, tmp_path)
    path = broken / entry["name"]
    data = bytearray(path.read_bytes())
    for sample in range(entry["samples"]):   # every sample of the first shard: ids reversed
        start = sample * 1024 + 512
        data[start:start + 2 * (SEQ + 1)] = bytes(reversed(data[start:start + 2 * (SEQ + 1)]))
    path.write_bytes(bytes(data))
    rc = main(["model=titans", "size=tiny", "train=tiny", "train.steps=8", f"train.seq_len={SEQ}",
               "train.micro_batch_size=4", "model.vocab_size=300", "train.data.kind=shards",
               f"train.data.shards.path={broken}", "train.eval_every=0", "train.data.eval_batches=1",
               "train.tensorboard=false", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1 and f"error: shard {path}, sample" in err and "Traceback" not in err


# --- data identity -----------------------------------------------------------------------------

def _train(out: Path, shard_dir: Path, *extra: str) -> tuple[int, str]:
    from megatron_atlas.train.__main__ import main
    return main(["model=titans", "size=tiny", "train=tiny", "train.steps=2", f"train.seq_len={SEQ}",
                 "train.micro_batch_size=2", "model.vocab_size=320", "train.data.kind=shards",
                 f"train.data.shards.path={shard_dir}", "train.eval_every=0", "train.data.eval_batches=1",
                 "train.tensorboard=false", "train.device=cpu", "train.warmup_steps=1", f"train.out_dir={out}",
                 *extra])


def test_resume_on_shards_of_another_tokenizer_is_refused(shards, tmp_path, capsys):
    other = tmp_path / "other"
    _prepare(shards.parent / "text", other, vocab_size=320)   # another BPE over the same text
    run = tmp_path / "run"
    assert _train(run, shards, "train.exit_at_step=1") == 0
    from megatron_atlas.train.checkpoint import find_latest, load_checkpoint
    recorded = load_checkpoint(find_latest(run))["loader"]["data"]
    assert recorded["tokenizer_sha256"] == read_index(shards)["tokenizer"]["sha256"]
    capsys.readouterr()
    assert _train(run, other, "train.resume=auto") == 2
    err = capsys.readouterr().err
    assert "trained on other data" in err and "tokenizer_sha256" in err and "train.data.allow_data_change" in err
    assert _train(run, other, "train.resume=auto", "train.data.allow_data_change=true") == 0


def test_check_identity():
    a = {"kind": "shards", "tokenizer_sha256": "aa", "shards_sha256": "s1"}
    check_identity(None, a, allow=False)   # a checkpoint from before identities
    check_identity(dict(a), a, allow=False)
    with pytest.raises(ConfigError, match="shards_sha256 's1' -> 's2'"):
        check_identity(a, {**a, "shards_sha256": "s2"}, allow=False)
    check_identity(a, {**a, "shards_sha256": "s2"}, allow=True)


# --- prepare_data --------------------------------------------------------------------------------

def test_a_fifo_argument_is_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--out", str(tmp_path / "o"),
                          str(fifo), "--vocab-size", "280", "--workers", "1"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "is a FIFO" in run.stderr


def test_odd_entries_in_folders_are_skipped_and_counted(tmp_path):
    corpus = _corpus(tmp_path / "text", n_docs=6)
    outside = tmp_path / "system.txt"
    outside.write_text("a file outside the corpus folder")
    os.mkfifo(corpus / "pipe.txt")
    (corpus / "broken.txt").symlink_to(tmp_path / "gone.txt")
    (corpus / "escape.txt").symlink_to(outside)
    (corpus / "inside.txt").symlink_to(corpus / "doc000.txt")   # a link within the tree is read
    counts: Counter = Counter()
    files = expand_inputs([corpus], counts)
    assert counts == {"not_regular": 2, "outside_tree": 1}
    assert corpus / "escape.txt" not in files and corpus / "inside.txt" in files
    from megatron_atlas.data.prepare import PrepareArgs, prepare
    index = prepare(PrepareArgs(out_dir=str(tmp_path / "o"), seq_len=SEQ, vocab_size=300, workers=1), files,
                    log=lambda _: None, counts=counts)
    assert index["skipped"]["not_regular"] == 2 and index["skipped"]["outside_tree"] == 1
    assert index["input"]["files"] == 7


def test_rerun_after_an_edit_of_the_same_size_is_not_nothing_to_do(tmp_path):
    text = _corpus(tmp_path / "text", n_docs=10)
    out = tmp_path / "o"
    _prepare(text, out)
    doc = text / "doc000.txt"
    doc.write_text(doc.read_text()[::-1])   # same size, other contents
    with pytest.raises(ValueError, match="different job"):
        _prepare(text, out)


@pytest.mark.parametrize("damage", ["delete", "truncate", "checksums"])
def test_rerun_restores_deleted_or_truncated_shards(tmp_path, damage):
    text = _corpus(tmp_path / "text", n_docs=20)
    out = tmp_path / "o"
    _prepare(text, out)
    want = {p.name: p.read_bytes() for p in out.iterdir()}
    entry = read_index(out)["splits"]["train"]["shards"][1]
    path = out / entry["name"]
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:700])
    else:
        (out / entry["crc32"]).unlink()
    lines: list[str] = []
    from megatron_atlas.data.prepare import PrepareArgs, prepare
    prepare(PrepareArgs(out_dir=str(out), seq_len=SEQ, vocab_size=300, val_fraction=0.2, seed=1,
                        samples_per_shard=25, workers=1), expand_inputs([text]), log=lines.append)
    assert not any("nothing to do" in line for line in lines)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == want


# VmHWM, not getrusage's maxrss: the latter carries the forking (pytest) process's peak over execve
_MEASURE = """
import sys
from megatron_atlas.data.documents import expand_inputs
from megatron_atlas.data.prepare import PrepareArgs, prepare
prepare(PrepareArgs(out_dir=sys.argv[2], seq_len=64, tokenizer=sys.argv[3], workers=1), expand_inputs([sys.argv[1]]),
        log=lambda _: None)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) // 1024)
"""


def test_a_long_single_line_document_is_encoded_in_bounded_memory(tmp_path):
    from megatron_atlas.data.tokenizer import train_bpe
    rng = np.random.default_rng(0)
    words = [f"{w}{n}" for w, n in zip(rng.choice(["alpha", "beta", "gamma", "delta"], 600_000),
                                       rng.integers(0, 1000, 600_000))]
    doc = tmp_path / "line.txt"
    doc.write_text(" ".join(words))   # 5 MB, no newline: 740 MB peak when encoded whole, 150 MB in pieces
    tok = tmp_path / "tok.json"
    train_bpe([" ".join(words[:2000])], 300).save(tok)
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(doc), str(tmp_path / "o"), str(tok)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 350, run.stdout   # MB


def test_pieces_of_a_long_text_encode_to_the_ids_of_the_whole():
    from megatron_atlas.data.fast_bpe import FastByteLevelEncoder
    from megatron_atlas.data.tokenizer import train_bpe
    text = "  ".join(f"word{i}, it's  {i % 7}!\n\tnext" for i in range(3000))
    tok = train_bpe([text[:20000]], 300)
    whole = tok.encode_batch([text])[0]
    split = FastByteLevelEncoder(tok, max_piece_chars=997)
    assert split.max_piece_chars == 997 and split.encode_batch([text, "short"]) == [whole, tok.encode_batch(["short"])[0]]


def test_parquet_with_invalid_utf8_is_decoded_and_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    raw = pa.array([b"good text here", b"bad \xff\xfe text"], type=pa.binary())
    table = pa.table({"text": pa.Array.from_buffers(pa.string(), 2, raw.buffers())})   # unchecked UTF-8
    pq.write_table(table, tmp_path / "docs.parquet")
    from megatron_atlas.data.documents import iter_documents
    counts: Counter = Counter()
    docs = list(iter_documents([tmp_path / "docs.parquet"], counts))
    assert docs == ["good text here", "bad \ufffd\ufffd text"] and counts["non_utf8"] == 1


def test_explicit_non_regular_file_is_a_bad_input_or_skipped(tmp_path):
    from megatron_atlas.data.documents import iter_documents
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="is a FIFO"):
        list(iter_documents([fifo], Counter()))
    counts: Counter = Counter()
    assert list(iter_documents([fifo], counts, skip_bad_files=True)) == [] and counts["bad_files"] == 1
