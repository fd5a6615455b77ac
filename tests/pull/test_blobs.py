"""The content-addressed cache: layout, atomic commits, locks across processes, LRU gc."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.imagebuilder import sha256_digest
from worker.cache.blobs import BlobCache
from worker.cache.index import EntryKind, IndexEntry, LayerIndex
from worker.errors import LayerError

ROOT = Path(__file__).resolve().parents[2]


def put(cache: BlobCache, data: bytes, indexed: bool = True) -> str:
    digest = sha256_digest(data)
    with cache.temp_file(digest) as (f, tmp):
        f.write(data)
        f.flush()
        index = LayerIndex(digest, digest, "m", "none", len(data), len(data),
                           (IndexEntry("a", EntryKind.FILE),)) if indexed else None
        cache.commit(digest, tmp, index)
    return digest


def test_layout_and_queries(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = put(cache, b"hello")
    hexd = digest.split(":")[1]
    assert (tmp_path / "sha256" / hexd).read_bytes() == b"hello"
    assert (tmp_path / "sha256" / f"{hexd}.index").is_file()
    assert cache.has(digest) and cache.has_index(digest)
    with cache.open(digest) as f:
        assert f.read() == b"hello"
    idx = cache.index(digest)
    assert idx is not None and idx.entries[0].path == "a"
    assert list(cache.tmp_dir.iterdir()) == []
    assert cache.delete(digest) and not cache.has(digest) and not cache.has_index(digest)
    with pytest.raises(LayerError, match="not in the cache"):
        cache.open(digest)


def test_hostile_digests_never_become_paths(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    for bad in ["sha256:../../etc/passwd", "sha512:" + "a" * 128, "sha256:" + "A" * 64, "x"]:
        with pytest.raises(LayerError, match="invalid blob digest"):
            cache.path(bad)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = sha256_digest(b"data")
    with pytest.raises(RuntimeError), cache.temp_file(digest) as (f, _tmp):
        f.write(b"da")
        raise RuntimeError("network died")
    assert not cache.has(digest)
    assert list(cache.tmp_dir.iterdir()) == [] and cache.entries() == []


def test_touch_and_lru_gc(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digests = [put(cache, bytes([i]) * 1000) for i in range(4)]
    now = time.time()
    for age, d in zip((400, 300, 200, 100), digests, strict=True):
        os.utime(cache.path(d), (now - age, now - age))
    cache.touch(digests[0])                      # used just now: the newest
    order = [e.digest for e in cache.entries()]
    assert order == [digests[1], digests[2], digests[3], digests[0]]
    keep = sum(e.size for e in cache.entries() if e.digest in (digests[3], digests[0]))
    evicted = cache.gc(keep)
    assert [e.digest for e in evicted] == [digests[1], digests[2]]
    assert {e.digest for e in cache.entries()} == {digests[3], digests[0]}
    assert cache.total_size() <= keep


def test_gc_never_evicts_a_locked_blob(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    a, b = put(cache, b"a" * 100), put(cache, b"b" * 100)
    os.utime(cache.path(a), (1, 1))
    with cache.lock(a, shared=True):               # a reader is flattening from it
        evicted = cache.gc(0)
    assert [e.digest for e in evicted] == [b]
    assert cache.has(a)


def test_gc_sweeps_stale_temps_and_orphan_indexes(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    stale = cache.tmp_dir / "dead.part"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    fresh = cache.tmp_dir / "alive.part"
    fresh.write_bytes(b"y")
    orphan = cache.blob_dir / ("c" * 64 + ".index")
    orphan.write_bytes(b"z")
    cache.gc(1 << 40)
    assert not stale.exists() and fresh.exists() and not orphan.exists()


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = sha256_digest(b"shared")
    marker = tmp_path / "child-got-lock"
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from worker.cache.blobs import BlobCache
        c = BlobCache({str(tmp_path)!r})
        with c.lock({digest!r}, blocking=False) as got:
            print("busy" if not got else "free", flush=True)
        with c.lock({digest!r}):
            open({str(marker)!r}, "w").write(str(time.time()))
    """)
    with cache.lock(digest):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "busy"
        time.sleep(0.5)
        assert not marker.exists()               # still waiting for us
        released = time.time()
    assert proc.wait(timeout=30) == 0
    assert float(marker.read_text()) >= released
