"""Text documents out of webdataset shards (tars of `KEY.txt` / `KEY.json` members), read through
the webdataset library: local paths, `pipe:CMD` (e.g. `pipe:aws s3 cp s3://b/x.tar -`), `http(s)://`
URLs (fetched with curl), and brace patterns (`shard-{000000..000099}.tar`) expanded in order.

A sample is one document: its `.txt` (or `.text`) member, else the `--text-field` of its `.json`
member. Samples with neither are counted (`no_text_member`), never tokenized.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from megatron_atlas.data.documents import decode_text

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TEXT_MEMBERS = ("txt", "text")


def is_webdataset(spec: str | Path) -> bool:
    """A shard URL or pattern (pipe:, http(s)://, braces) or a local tar file."""
    text = str(spec)
    return (text.startswith("pipe:") or "://" in text or ("{" in text and ".." in text)
            or text.endswith(TAR_SUFFIXES))


def expand_urls(specs: Sequence[str | Path]) -> List[str]:
    """Each spec's brace pattern expanded (`a-{00..02}.tar` -> a-00.tar a-01.tar a-02.tar), in order."""
    from webdataset.shardlists import expand_urls as wds_expand

    urls: List[str] = []
    for spec in specs:
        urls += wds_expand(str(spec))
    return urls


def iter_samples(url: str) -> Iterator[dict]:
    """The samples (members grouped by key) of one shard, in tar order; errors name the shard."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = gopen(url, "rb")
    except Exception as e:   # gopen raises what the scheme's opener raises
        raise OSError(f"cannot open webdataset shard {url}: {e}") from None
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except OSError:
        raise
    except Exception as e:   # tarfile.ReadError and the like, from a truncated or non-tar stream
        raise OSError(f"webdataset shard {url}: {type(e).__name__}: {e}") from None
    finally:
        stream.close()


def sample_text(sample: dict, text_field: str, counts: Counter) -> Optional[str]:
    """The document of one sample, or None (counted under `no_text_member` / `bad_json` /
    `missing_field` / `non_utf8`)."""
    for ext in TEXT_MEMBERS:
        if ext in sample:
            data = sample[ext]
            counts["bytes"] += len(data)
            return decode_text(data, counts)
    if "json" in sample:
        counts["bytes"] += len(sample["json"])
        try:
            record = json.loads(decode_text(sample["json"], counts))
        except json.JSONDecodeError:
            counts["bad_json"] += 1
            return None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            counts["missing_field"] += 1
            return None
        return text
    counts["no_text_member"] += 1
    return None


def shard_documents(url: str, text_field: str, counts: Counter) -> Iterator[str]:
    """The documents of one shard, in order (samples without text are counted and skipped)."""
    for sample in iter_samples(url):
        text = sample_text(sample, text_field, counts)
        if text is not None:
            yield text
