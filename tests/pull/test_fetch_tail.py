"""The temp file the indexer reads right behind the download (worker/pull/fetch.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from worker.errors import LayerError
from worker.pull.fetch import _DownloadStopped, _Tail


def test_reader_gets_every_byte_as_it_lands(tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (1, 4096, 1 << 20, (3 << 20) + 7, 0, 12345)]
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT)
    tail = _Tail(fd, layer="sha256:" + "a" * 64, where=str(tmp_path))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(tail.chunks(size=1 << 20)))
    reader.start()
    for piece in pieces:
        tail.write(piece)
    tail.finish()
    reader.join(30)
    os.close(fd)
    assert not reader.is_alive()
    assert b"".join(got) == b"".join(pieces)
    assert max(len(c) for c in got) <= 1 << 20      # reads are bounded, whatever was written


def test_abort_stops_a_waiting_reader(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT)
    tail = _Tail(fd, layer="sha256:" + "b" * 64, where=str(tmp_path))
    tail.write(b"x" * 100)
    chunks = tail.chunks()
    assert next(chunks) == b"x" * 100
    failure: list[BaseException] = []

    def read_rest() -> None:
        try:
            list(chunks)
        except _DownloadStopped as exc:
            failure.append(exc)

    reader = threading.Thread(target=read_rest)
    reader.start()       # waits for bytes that will never come
    tail.abort()
    reader.join(30)
    os.close(fd)
    assert not reader.is_alive() and failure


def test_write_failure_names_the_cache(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "part", os.O_RDONLY | os.O_CREAT)
    tail = _Tail(fd, layer="sha256:" + "c" * 64, where=str(tmp_path))
    with pytest.raises(LayerError, match="cannot write to the cache") as info:
        tail.write(b"data")
    os.close(fd)
    assert "sha256:" + "c" * 64 in str(info.value)
