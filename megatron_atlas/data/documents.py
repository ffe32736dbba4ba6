"""Documents out of input files, in a fixed order, with bad input counted rather than fatal.

Plain text files (one document per file), JSONL (one document per line, in a `text` field),
Parquet (a `text` column; needs pyarrow) and webdataset shards of text (`.tar` files, `pipe:` and
`http(s)://` URLs, brace patterns; one document per sample, see wds_text.py). Folders are walked in
sorted order, so the same inputs give the same document sequence on every machine.

Inside a folder only regular files are read: FIFOs, sockets, devices and broken links are skipped
and counted (`not_regular`), and so are links that lead out of the folder (`outside_tree`: a link to
a system file must not be tokenized). A path named on the command line that is not a regular file
is a bad input (reading a FIFO would block forever).
"""
from __future__ import annotations

import json
import os
import stat
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SKIP_DIRS = {"__pycache__", "site-packages", ".git"}


class BadInputError(RuntimeError):
    pass


def _folder_files(folder: Path, counts: Counter) -> list[Path]:
    """The regular files under `folder` (sorted, hidden ones left out); others are counted."""
    root = folder.resolve()
    files = []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") or part in SKIP_DIRS for part in p.relative_to(folder).parts):
            continue
        if p.is_symlink() and p.exists() and not p.resolve().is_relative_to(root):
            counts["outside_tree"] += 1
        elif p.is_file():
            files.append(p)
        elif not p.is_dir():   # a FIFO, socket, device or broken link
            counts["not_regular"] += 1
    return files


def expand_inputs(inputs: Sequence[str | Path], counts: Optional[Counter] = None) -> list[Path | str]:
    """Files as given; folders replaced by their regular files (recursive, sorted, hidden files left
    out, the rest counted in `counts`); webdataset URLs and brace patterns expanded into one URL (a
    str) per shard."""
    from megatron_atlas.data.wds_text import expand_urls, is_webdataset

    counts = Counter() if counts is None else counts
    files: list[Path | str] = []
    for spec in inputs:
        item = Path(spec)
        if is_webdataset(spec) and not item.exists():   # a URL or a pattern: not a local path
            files += expand_urls([spec])
        elif item.is_dir():
            files += _folder_files(item, counts)
        else:
            files.append(item)   # a missing file is reported when it is read
    return files


def _regular_file(path: Path) -> None:
    mode = os.stat(path).st_mode   # FileNotFoundError for a missing file or a broken link
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise BadInputError(f"{path} is {kind}; reading it could block or never end")


def default_corpus() -> list[Path]:
    """The Python standard library's own sources and docs: a corpus every machine has (no download)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in expand_inputs([root]) if p.suffix in (".py", ".rst", ".txt")]


def decode_text(data: bytes, counts: Counter) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counts["non_utf8"] += 1   # kept, with U+FFFD in place of the bad bytes
        return data.decode("utf-8", errors="replace")


def _jsonl(data: bytes, field: str, counts: Counter) -> Iterator[str]:
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(decode_text(line, counts))
        except json.JSONDecodeError:
            counts["bad_json"] += 1
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            counts["missing_field"] += 1
            continue
        yield text


def _parquet(path: Path, field: str, counts: Counter) -> Iterator[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError(f"{path}: Parquet input needs the pyarrow package (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as e:
        raise BadInputError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in table.column_names:
        raise BadInputError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
    column = table.column(field)
    if pyarrow.types.is_string(column.type) or pyarrow.types.is_large_string(column.type):
        # as bytes: pyarrow does not check UTF-8 when reading, and to_pylist() would raise on the first
        # invalid value; decoded here like text and JSONL input (counted, with U+FFFD replacements)
        column = column.cast(pyarrow.large_binary())
    for value in column.to_pylist():
        if isinstance(value, bytes):
            yield decode_text(value, counts)
        else:
            counts["missing_field"] += 1


def iter_documents(files: Sequence[Path | str], counts: Counter, *, text_field: str = "text",
                   skip_bad_files: bool = False) -> Iterator[str]:
    """Non-empty documents of every file in order. `counts` gains: files, bytes, documents and the
    skips (non_utf8 (kept, decoded with replacement), empty, missing_field, bad_json, bad_files,
    no_text_member: webdataset samples without a .txt or .json member)."""
    from megatron_atlas.data.wds_text import is_webdataset, shard_documents

    for spec in files:
        path = Path(spec)
        try:
            if is_webdataset(spec):
                texts: Iterator[str] = shard_documents(str(spec), text_field, counts)
            elif path.suffix in PARQUET_SUFFIXES:
                _regular_file(path)
                counts["bytes"] += path.stat().st_size
                texts = _parquet(path, text_field, counts)
            else:
                _regular_file(path)
                data = path.read_bytes()
                counts["bytes"] += len(data)
                texts = (_jsonl(data, text_field, counts) if path.suffix in JSONL_SUFFIXES
                         else iter([decode_text(data, counts)]))
            docs = list(texts)   # read the whole file here, so an error names it
        except (OSError, BadInputError) as e:
            if not skip_bad_files:
                raise BadInputError(f"cannot read input {spec}: {e} (--skip-bad-files skips and counts "
                                    "such files)") from None
            counts["bad_files"] += 1
            continue
        counts["files"] += 1
        for text in docs:
            if not text.strip():
                counts["empty"] += 1
                continue
            counts["documents"] += 1
            yield text
