"""Data from pipes: `--data <(zcat rows.jsonl.gz)`, a named pipe (FIFO), /dev/stdin. A pipe is read once, as it
comes; a format that would need a second read is refused before anything is read, saying why."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sstoken.data.sources import is_stream, load_data
from sstoken.errors import ConfigError, DataError

MAX_LEN = 96
ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} equals {2 * i}."} for i in range(40)]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS).encode()  # 40 rows: more than one read of the pipe


def _feed(path: Path, data: bytes) -> threading.Thread:
    """Write ``data`` into the named pipe ``path`` from a thread (opening a FIFO blocks until a reader opens it)."""
    def write():
        with open(path, "wb") as handle:
            handle.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _encoded(rows) -> list[tuple[list[int], list[int]]]:
    return [(r["input_ids"], r["labels"]) for r in rows]


@pytest.fixture
def from_file(tmp_path, tok):
    path = tmp_path / "file.jsonl"
    path.write_bytes(JSONL)
    return load_data(str(path), tok, MAX_LEN)


def test_named_pipe_of_json_lines_reads_as_the_file_does(tmp_path, tok, from_file):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    assert is_stream(fifo) and not is_stream(tmp_path / "file.jsonl") and not is_stream(tmp_path)
    writer = _feed(fifo, JSONL)
    rows, stats = load_data(str(fifo), tok, MAX_LEN)
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert stats == from_file[1] and stats.used == len(ROWS)
    assert _encoded(rows) == _encoded(from_file[0])


def test_compressed_named_pipe_and_an_anonymous_pipe(tmp_path, tok, from_file):
    fifo = tmp_path / "rows.jsonl.gz"  # the name says how to decompress
    os.mkfifo(fifo)
    writer = _feed(fifo, gzip.compress(JSONL))
    rows, _ = load_data(str(fifo), tok, MAX_LEN)
    writer.join(timeout=30)
    assert _encoded(rows) == _encoded(from_file[0])

    # What `--data <(zcat rows.jsonl.gz)` passes: /dev/fd/N, a pipe with no name to go by (read as JSON Lines).
    read_end, write_end = os.pipe()

    def write():
        with os.fdopen(write_end, "wb") as handle:
            handle.write(JSONL)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        rows, _ = load_data(f"/dev/fd/{read_end}", tok, MAX_LEN)
    finally:
        os.close(read_end)
    writer.join(timeout=30)
    assert _encoded(rows) == _encoded(from_file[0])


def test_dev_stdin_reads_the_piped_rows(tmp_path):
    src = Path(__file__).resolve().parents[2] / "src"
    script = ("from sstoken.data.sources import load_data; from sstoken.testing import tiny_tokenizer; "
              "rows, stats = load_data('/dev/stdin', tiny_tokenizer(), 96); print(stats.used)")
    env = dict(os.environ, PYTHONPATH=str(src), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], input=JSONL, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split()[-1] == str(len(ROWS))


def test_a_format_that_needs_a_second_read_is_refused_before_reading(tmp_path, tok):
    fifo = tmp_path / "rows.parquet"
    os.mkfifo(fifo)  # no writer: the refusal must not open the pipe (which would wait for one)
    with pytest.raises(ConfigError, match=r"rows.parquet is a pipe, which can be read only once; parquet data is "
                                          r"read by the datasets library, which opens a file twice"):
        load_data(str(fifo), tok, MAX_LEN)


def test_a_json_array_in_a_pipe_is_refused_with_the_reason(tmp_path, tok):
    fifo = tmp_path / "rows.json"
    os.mkfifo(fifo)
    writer = _feed(fifo, json.dumps(ROWS[:3]).encode())
    with pytest.raises(ConfigError, match="is a pipe holding one JSON array"):
        load_data(str(fifo), tok, MAX_LEN)
    writer.join(timeout=30)


def test_an_empty_or_compressed_pipe_says_what_it_got(tmp_path, tok):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    writer = _feed(fifo, b"")
    with pytest.raises(DataError, match=r"no rows \(the pipe is empty, was read already or has only blank lines\)"):
        load_data(str(fifo), tok, MAX_LEN)
    writer.join(timeout=30)
    unnamed = tmp_path / "rows"  # gzip bytes in a pipe whose name does not say .gz
    os.mkfifo(unnamed)
    writer = _feed(unnamed, gzip.compress(JSONL))
    with pytest.raises(DataError, match=r"rows:1: not valid UTF-8.*looks compressed"):
        load_data(str(unnamed), tok, MAX_LEN)
    writer.join(timeout=30)
