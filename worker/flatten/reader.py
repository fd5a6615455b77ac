"""Reading planned entries' bytes out of cached layer blobs, by offset, in one pass per layer.

Each layer blob is decompressed once, front to back, in 1 MiB chunks; the bytes between the
planned entries are skipped without being copied anywhere, and decompression stops after the
last byte the plan needs from that layer (the blob's digest and diff_id were verified when it
entered the cache, so the tail it would only re-verify is not worth the time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.cache.blobs import TAR_SUFFIX
from worker.cache.decompress import decompress_chunks, read_file_chunks
from worker.cache.index import LayerIndex
from worker.errors import Canceled, CorruptLayer

#: where a layer's compressed blob is: ``layer index -> path``
BlobLocator = Callable[[LayerIndex], "str | Path"]


def cache_blob_path(cache_dir: str | Path, digest: str) -> Path:
    """The blob cache layout: ``CACHE/sha256/<hex>``."""
    algo, _, hexd = digest.partition(":")
    if not hexd or "/" in hexd or "/" in algo or hexd.startswith("."):
        raise CorruptLayer(f"malformed layer digest {digest!r}")
    return Path(cache_dir) / algo / hexd


def cache_locator(cache_dir: str | Path) -> BlobLocator:
    """A :data:`BlobLocator` for the blob cache at ``cache_dir``."""
    def locate(layer: LayerIndex) -> Path:
        return cache_blob_path(cache_dir, layer.digest)
    return locate


def open_layer(locate: BlobLocator, layer: LayerIndex, *,
               cancel: threading.Event | None = None) -> LayerStream:
    """A :class:`LayerStream` over ``layer``: its uncompressed tar where the cache keeps one
    beside the blob (and it has the indexed size), else the blob, inflated on the way. A tar
    whose blob is gone is an orphan of an interrupted eviction: never read."""
    path = Path(locate(layer))
    if layer.compression != "none" and path.is_file():
        plain = path.with_name(path.name + TAR_SUFFIX)
        try:
            whole = plain.stat().st_size == layer.uncompressed_size
        except OSError:
            whole = False
        if whole:
            return LayerStream(plain, "none", layer=layer.digest, cancel=cancel)
    return LayerStream(path, layer.compression, layer=layer.digest, cancel=cancel)


class LayerStream:
    """Forward-only access to a layer's uncompressed tar by absolute offset."""

    def __init__(self, path: str | Path, compression: str, *, layer: str | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.layer = layer
        self._cancel = cancel
        self._chunks: Iterator[bytes] = decompress_chunks(read_file_chunks(str(path)),
                                                          compression, layer=layer)
        self._buf = memoryview(b"")
        self.pos = 0          # absolute offset of self._buf[0]

    def _more(self, need_offset: int) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Canceled("export canceled")
        try:
            chunk = next(self._chunks)
        except StopIteration:
            raise CorruptLayer(f"uncompressed layer ends at byte {self.pos + len(self._buf)}, "
                               f"but the index needs byte {need_offset}",
                               layer=self.layer) from None
        except FileNotFoundError:
            raise CorruptLayer("blob is missing from the cache", layer=self.layer) from None
        self.pos += len(self._buf)
        self._buf = memoryview(chunk)

    def skip_to(self, offset: int) -> None:
        """Advance to ``offset`` (never backwards), discarding the bytes in between."""
        if offset < self.pos:
            raise CorruptLayer(f"index entries overlap at byte {offset}", layer=self.layer)
        while offset > self.pos + len(self._buf):
            self._more(offset)
        self._buf = self._buf[offset - self.pos:]
        self.pos = offset

    def read(self, n: int) -> Iterator[memoryview]:
        """Yield pieces of the next ``n`` bytes (views valid until the next call)."""
        while n > 0:
            if not len(self._buf):
                self._more(self.pos + n)
                continue
            piece = self._buf[:n]
            self._buf = self._buf[len(piece):]
            self.pos += len(piece)
            n -= len(piece)
            yield piece

    def read_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes as one bytes object (for headers: small)."""
        return b"".join(bytes(p) for p in self.read(n))

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._buf = memoryview(b"")
