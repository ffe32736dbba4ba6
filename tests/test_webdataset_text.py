"""prepare_data over webdataset shards of raw text (KEY.txt / KEY.json members, PAX headers as
Python's tarfile writes them): local tars, `pipe:` commands and http:// URLs with brace patterns
(a local http.server, no network) all give the shards the same documents as plain text files give."""
from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from megatron_atlas.data.documents import expand_inputs, iter_documents
from megatron_atlas.data.prepare import PrepareArgs, prepare

WORDS = "alpha beta gamma delta memory atlas titan token shard window epoch batch".split()


def documents(n: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(d + i) % len(WORDS)] for i in range(20 + d)) + f" ünï {d + offset}"
            for d in range(n)]


def write_tar(path: Path, texts: list[str], as_json: bool = False, extra_member: bool = False) -> Path:
    """A webdataset shard as `tar` users make them (PAX format: the headers prepare_data used to read
    as text)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, text in enumerate(texts):
            name, data = (f"doc{i:04d}.json", json.dumps({"text": text}).encode()) if as_json \
                else (f"doc{i:04d}.txt", text.encode())
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"comment": "x" * 10}
            tar.addfile(info, io.BytesIO(data))
        if extra_member:   # a sample with no text member: counted, not tokenized
            info = tarfile.TarInfo("image0001.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"\xff\xd8\xff"))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    tars = root / "tars"
    tars.mkdir()
    texts = [documents(6, 0), documents(5, 100), documents(7, 200)]
    for i, t in enumerate(texts):
        write_tar(tars / f"text-{i:02d}.tar", t, as_json=i == 1, extra_member=i == 2)
    plain = root / "plain"
    plain.mkdir()
    for n, text in enumerate(t for shard in texts for t in shard):
        (plain / f"d{n:03d}.txt").write_text(text)
    return root, tars, plain, [t for shard in texts for t in shard]


@pytest.fixture(scope="module")
def server(corpus):
    _, tars, _, _ = corpus
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tars))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _prepared(inputs: list, out: Path) -> dict:
    args = PrepareArgs(out_dir=str(out), seq_len=16, vocab_size=300, val_fraction=0.0, seed=1,
                       samples_per_shard=10, workers=1)
    return prepare(args, expand_inputs(inputs), log=lambda line: None)


def test_local_tar_yields_its_documents_not_its_headers(corpus):
    _, tars, _, texts = corpus
    counts = Counter()
    got = list(iter_documents(expand_inputs([tars]), counts))
    assert got == texts
    assert counts["files"] == 3 and counts["no_text_member"] == 1 and counts["documents"] == len(texts)
    assert not any("PaxHeader" in t or "ustar" in t for t in got)


def test_prepare_from_tars_pipe_and_http_urls_equals_plain_files(corpus, server, tmp_path):
    root, tars, plain, texts = corpus
    reference = _prepared([plain], tmp_path / "plain")
    urls = {
        "local": [str(tars)],
        "pipe": [f"pipe:cat {tars}/text-{{00..02}}.tar"],
        "http": [f"{server}/text-{{00..01}}.tar", f"{server}/text-02.tar"],
    }
    for name, inputs in urls.items():
        index = _prepared(inputs, tmp_path / name)
        assert index["input"]["documents"] == len(texts), name
        assert index["skipped"]["no_text_member"] == 1, name
        assert index["splits"] == reference["splits"], name
        for shard in reference["splits"]["train"]["shards"]:
            assert (tmp_path / name / shard["name"]).read_bytes() == (tmp_path / "plain" / shard["name"]).read_bytes()


def test_a_missing_url_is_named(tmp_path, server):
    with pytest.raises(Exception, match="nope-00.tar"):
        list(iter_documents(expand_inputs([f"pipe:cat {tmp_path}/nope-{{00..01}}.tar"]), Counter()))
