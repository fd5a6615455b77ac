"""The content-addressed blob cache, shareable between threads, processes and hosts.

Layout under ``root``::

    sha256/<hex>          the blob, only ever created by an atomic rename after verification
    sha256/<hex>.index    its entry index (:func:`worker.cache.index.dump_index`), same rule
    sha256/<hex>.tar      optional: a compressed layer's uncompressed tar, verified against its
                          diff_id in the same pass; renamed into place before the blob, so an
                          index never vouches for a partial one (readers also check its size)
    tmp/                  partial downloads, ``<hex>.<random>.part``, written under the
                          digest's lock: a temp whose digest lock is free is an orphan of a
                          killed writer, swept when a cache is opened
    locks/<hex>.lock      one lock file per digest (flock: exclusive to write, shared to read)

The mtime of a blob is its last use (``touch``), which ``gc`` evicts by, oldest first. A blob
whose lock anybody holds (a download or a reader) is never evicted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.cache.index import LayerIndex, dump_index, load_index
from worker.errors import CorruptLayer, LayerError
from worker.pull.reference import is_valid_digest

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".index"
TAR_SUFFIX = ".tar"
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
#: temp files older than this are leftovers of crashed writers
STALE_TEMP_SECONDS = 24 * 3600

# flock() conflicts between file descriptors, so it already serialises threads that open the
# lock file separately; on NFS, Linux emulates flock with POSIX locks, which are per process,
# so threads of one process additionally take an in-process lock.
_thread_locks: dict[tuple[str, str], threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(root: Path, digest: str) -> threading.Lock:
    key = (str(root), digest)
    with _thread_locks_guard:
        lock = _thread_locks.get(key)
        if lock is None:
            lock = _thread_locks[key] = threading.Lock()
        return lock


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached blob, as listed by ``cache ls``."""

    digest: str
    size: int               # blob bytes (plus its index and uncompressed tar, if any)
    last_used: float        # epoch seconds
    indexed: bool


class BlobCache:
    """A content-addressed store of verified blobs and their layer indexes."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.lock_dir = self.root / "locks"
        for d in (self.blob_dir, self.tmp_dir, self.lock_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.sweep_orphan_temps()

    # -- naming -------------------------------------------------------------------------
    @staticmethod
    def _hex(digest: str) -> str:
        # The digest comes from a registry: it becomes a file name only once it is
        # known to be sha256:<64 hex> (no "../" games).
        if not is_valid_digest(digest):
            raise LayerError(f"invalid blob digest {digest!r}")
        return digest[len("sha256:"):]

    def path(self, digest: str) -> Path:
        """Where the blob for ``digest`` lives (whether or not it is present)."""
        return self.blob_dir / self._hex(digest)

    def index_path(self, digest: str) -> Path:
        return self.blob_dir / (self._hex(digest) + INDEX_SUFFIX)

    def tar_path(self, digest: str) -> Path:
        """Where a compressed layer's uncompressed tar is kept (when it is)."""
        return self.blob_dir / (self._hex(digest) + TAR_SUFFIX)

    def lock_path(self, digest: str) -> Path:
        return self.lock_dir / (self._hex(digest) + ".lock")

    # -- queries --------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        """True if the verified blob is present."""
        return self.path(digest).is_file()

    def has_index(self, digest: str) -> bool:
        return self.index_path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        """Open the blob for reading; LayerError if it is not cached."""
        try:
            return open(self.path(digest), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise LayerError("blob is not in the cache", layer=digest) from None

    def index(self, digest: str) -> LayerIndex | None:
        """The stored layer index, or None if there is none (CorruptLayer if unreadable)."""
        try:
            data = self.index_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return load_index(data)
        except CorruptLayer as exc:
            raise CorruptLayer(f"cached index is unreadable ({exc}); run `rootfs-export cache "
                               f"gc` or delete {self.index_path(digest)}", layer=digest) from None

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, digest: str, *, shared: bool = False,
             blocking: bool = True) -> Iterator[bool]:
        """Hold the digest's lock; yields False (without holding it) if not ``blocking`` and busy.

        Writers take it exclusive; readers (flattening from a cached blob) take it shared so
        ``gc`` leaves the blob alone meanwhile.
        """
        tlock = None if shared else _thread_lock(self.root, digest)
        if tlock is not None and not tlock.acquire(blocking):
            yield False
            return
        try:
            fd = os.open(self.lock_path(digest), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | \
                    (0 if blocking else fcntl.LOCK_NB)
                try:
                    fcntl.flock(fd, flags)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        yield False
                        return
                    if exc.errno not in _NO_LOCKING:
                        raise
                    # A shared filesystem without locks: writers then race on temp files
                    # and the last atomic rename wins, which is still safe (same content).
                    log.warning("cache %s: file locks unsupported (%s); concurrent fetches "
                                "may download a blob twice", self.root, exc.strerror)
                yield True
            finally:
                os.close(fd)  # releases the flock
        finally:
            if tlock is not None:
                tlock.release()

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def temp_file(self, digest: str) -> Iterator[tuple[BinaryIO, Path]]:
        """A uniquely named temp file in ``tmp/``, removed unless :meth:`commit` took it."""
        fd, name = tempfile.mkstemp(prefix=self._hex(digest) + ".", suffix=".part",
                                    dir=self.tmp_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as f:
                yield f, path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def commit(self, digest: str, temp: Path, index: LayerIndex | None = None, *,
               tar: Path | None = None) -> Path:
        """Move a verified temp file into place (atomic rename), then store its index.

        The caller has verified the content. ``tar``, a temp file holding the layer's verified
        uncompressed tar, goes first, then the blob, then the index, so a present index always
        has its blob (and any tar beside it is whole); a blob without index is re-indexed by
        the next fetch.
        """
        final = self.path(digest)
        if tar is not None:
            with open(tar, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tar, self.tar_path(digest))
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
        if index is not None:
            self.put_index(digest, index)
        self._fsync_dir()
        return final

    def put_index(self, digest: str, index: LayerIndex) -> None:
        data = dump_index(index)
        fd, name = tempfile.mkstemp(prefix=self._hex(digest) + ".", suffix=".index.part",
                                    dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self.index_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Store small verified content (configs) under its digest."""
        with self.temp_file(digest) as (f, path):
            f.write(data)
            f.flush()
            return self.commit(digest, path)

    def _fsync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.blob_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- maintenance ---------------------------------------------------------------------
    def touch(self, digest: str) -> None:
        """Record a use now (LRU eviction order)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest))

    def delete(self, digest: str) -> bool:
        """Remove blob, index and tar (low-disk mode, gc). True if something was removed."""
        removed = False
        for p in (self.index_path(digest), self.path(digest), self.tar_path(digest)):
            try:
                p.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def entries(self) -> list[CacheEntry]:
        """Cached blobs, least recently used first."""
        out: list[CacheEntry] = []
        for p in self.blob_dir.iterdir():
            name = p.name
            if len(name) != 64 or not is_valid_digest("sha256:" + name):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            size = st.st_size
            idx = p.with_name(name + INDEX_SUFFIX)
            try:
                size += idx.stat().st_size
                indexed = True
            except FileNotFoundError:
                indexed = False
            with contextlib.suppress(FileNotFoundError):
                size += p.with_name(name + TAR_SUFFIX).stat().st_size
            out.append(CacheEntry("sha256:" + name, size, st.st_mtime, indexed))
        out.sort(key=lambda e: (e.last_used, e.digest))
        return out

    def total_size(self) -> int:
        return sum(e.size for e in self.entries())

    def gc(self, max_size: int) -> list[CacheEntry]:
        """Evict least recently used blobs until the cache holds at most ``max_size`` bytes.

        Blobs whose lock is held (being written or read) are skipped. Stale temp files and
        orphan indexes are removed too. Returns what was evicted.
        """
        self._sweep_tmp()
        entries = self.entries()
        total = sum(e.size for e in entries)
        evicted: list[CacheEntry] = []
        for e in entries:
            if total <= max_size:
                break
            with self.lock(e.digest, blocking=False) as got:
                if not got:
                    continue
                if self.delete(e.digest):
                    total -= e.size
                    evicted.append(e)
            # Lock files stay: unlinking one while another process waits on it would let
            # a third process lock a fresh file and run alongside.
        return evicted

    def sweep_orphan_temps(self) -> list[Path]:
        """Remove temp files whose writer is gone (killed mid-download); return them.

        Writers hold the digest's exclusive lock for as long as their temp file exists, so a
        temp whose lock can be taken at once has no writer. Where the filesystem has no locks
        nothing is swept here (the age rule of :meth:`gc` still applies).
        """
        groups: dict[str, list[Path]] = {}
        try:
            names = list(self.tmp_dir.iterdir())
        except OSError:
            return []
        for p in names:
            hex_, _, _ = p.name.partition(".")
            if len(hex_) == 64 and is_valid_digest("sha256:" + hex_):
                groups.setdefault(hex_, []).append(p)
        swept: list[Path] = []
        for hex_, paths in groups.items():
            digest = "sha256:" + hex_
            tlock = _thread_lock(self.root, digest)
            if not tlock.acquire(blocking=False):
                continue
            try:
                fd = os.open(self.lock_path(digest), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    for p in paths:
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                            swept.append(p)
                except OSError:
                    pass   # a writer is at work, or no locks here: cannot tell
                finally:
                    os.close(fd)
            except OSError:
                pass   # a read-only cache: nothing to sweep
            finally:
                tlock.release()
        if swept:
            log.info("cache %s: removed %d temp file(s) left by a killed download", self.root,
                     len(swept))
        return swept

    def _sweep_tmp(self) -> None:
        now = time.time()
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    p.unlink()
        # an index or tar whose blob is gone (a writer killed between the renames)
        for suffix in (INDEX_SUFFIX, TAR_SUFFIX):
            for p in self.blob_dir.glob("*" + suffix):
                if not p.with_name(p.name[:-len(suffix)]).exists():
                    with contextlib.suppress(OSError):
                        p.unlink()
