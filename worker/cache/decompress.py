"""Layer decompression: gzip (isal when installed, else zlib), zstd, or none.

The compression is sniffed from the first bytes: media types lie often enough that magic bytes
are the truth. Errors at end of stream (truncation, bad CRC, trailing garbage in a member)
are raised, never swallowed.
"""

from __future__ import annotations

import types
import zlib
from collections.abc import Callable, Iterator

import zstandard

from worker.errors import CorruptLayer

_zlib: types.ModuleType
try:  # isal is ~2x faster than zlib for inflate; same API
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - depends on the installation
    _zlib = zlib

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: bytes 1-3 of a zstd skippable frame's magic (byte 0 is 0x50-0x5F)
ZSTD_SKIPPABLE = b"\x2a\x4d\x18"

CHUNK = 1 << 20
#: compressed zstd bytes handed to the decompressor at once: a zstd RLE block expands ~32768:1,
#: so this bounds one step's output to ~32 MiB even for a bomb
ZSTD_STEP = 1 << 10


def sniff_compression(head: bytes) -> str:
    """Return "gzip", "zstd" or "none" from the first bytes of a blob.

    A zstd stream may open with a skippable frame (magic 0x184D2A50-5F, little-endian), as
    pzstd and seekable-zstd writers do (an uncompressed tar opens with a file name, and none
    that a real image holds starts with those bytes).
    """
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 4 and head[1:4] == ZSTD_SKIPPABLE and head[0] & 0xF0 == 0x50:
        return "zstd"
    return "none"


def media_type_compression(media_type: str) -> str | None:
    """What the media type claims: "gzip", "zstd", "none", or None when it says nothing."""
    if media_type.endswith(("gzip", "+gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith((".tar", "v1.tar")):
        return "none"
    return None


def _new_zstd() -> zstandard.ZstdDecompressionObj:
    return zstandard.ZstdDecompressor().decompressobj()


class Decompressor:
    """Incremental decompressor: feed compressed chunks, get uncompressed chunks back.

    Used both while a blob streams in from the network and when re-reading it from the
    cache, so both paths share the same error handling.
    """

    def __init__(self, compression: str, *, layer: str | None = None) -> None:
        self.compression = compression
        self.layer = layer
        self._finished = False
        self._feed: Callable[[bytes], bytes]
        if compression == "gzip":
            # wbits 31: gzip wrapper; multi-member gzip is handled in feed().
            self._d = _zlib.decompressobj(31)
            self._feed = self._feed_gzip
        elif compression == "zstd":
            self._zd = _new_zstd()
            self._feed = self._feed_zstd
        elif compression == "none":
            self._feed = bytes
        else:
            raise CorruptLayer(f"unknown compression {compression!r}", layer=layer)

    def _feed_gzip(self, data: bytes) -> bytes:
        parts = list(self._inflate(data, 0))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _inflate(self, data: bytes, max_out: int) -> Iterator[bytes]:
        """Inflate ``data`` in pieces of at most ``max_out`` bytes (0: no bound)."""
        while True:
            try:
                out = self._d.decompress(data, max_out)
            except Exception as exc:  # zlib.error / isal error
                raise CorruptLayer(f"gzip stream is corrupt: {exc}", layer=self.layer) from None
            if out:
                yield out
            if self._d.eof:
                rest = self._d.unused_data
                # Concatenated gzip members are valid gzip; zero padding after the end is
                # tolerated (some tools pad blobs) but anything else is corruption.
                if rest and rest.lstrip(b"\0"):
                    if not rest.startswith(GZIP_MAGIC):
                        raise CorruptLayer("trailing garbage after gzip stream", layer=self.layer)
                    self._d = _zlib.decompressobj(31)
                    data = rest
                    continue
                return
            data = self._d.unconsumed_tail
            # A full piece may leave output pending inside the inflater even with no input
            # left: ask again until a piece comes back short.
            if not data and (not max_out or len(out) < max_out):
                return

    def _feed_zstd(self, data: bytes) -> bytes:
        parts = list(self._unzstd(data, 0))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _unzstd(self, data: bytes, max_out: int) -> Iterator[bytes]:
        """Decompress zstd ``data`` in pieces of about ``max_out`` bytes (0: one piece).

        The decompressor cannot bound its output, so input goes in :data:`ZSTD_STEP` slices
        (one slice of a bomb yields ~32 MiB at most) and outputs are gathered into pieces.
        A stream may hold several frames (zstd:chunked layers, parallel compressors) and
        skippable frames: each frame gets a fresh decompression object, started on the bytes
        the previous one did not use.
        """
        view = memoryview(data)
        pending: list[bytes] = []
        size = 0
        for start in range(0, len(view), ZSTD_STEP):
            piece: bytes | memoryview = view[start:start + ZSTD_STEP]
            while piece:
                if self._zd.eof:
                    self._zd = _new_zstd()
                try:
                    out = self._zd.decompress(piece)
                except zstandard.ZstdError as exc:
                    raise CorruptLayer(f"zstd stream is corrupt: {exc}",
                                       layer=self.layer) from None
                if out:
                    pending.append(out)
                    size += len(out)
                piece = self._zd.unused_data if self._zd.eof else b""
            if max_out and size >= max_out:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, size = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else b"".join(pending)

    def feed(self, data: bytes) -> bytes:
        """Decompress one chunk."""
        return self._feed(data)

    def feed_bounded(self, data: bytes, max_out: int = CHUNK) -> Iterator[bytes]:
        """Decompress one chunk as pieces of about ``max_out`` bytes, so a chunk of a
        decompression bomb never becomes one huge buffer (gzip: at most ``max_out``; zstd: at
        most ``max_out`` plus one step's output, ~32 MiB)."""
        if self.compression == "gzip":
            yield from self._inflate(data, max_out)
        elif self.compression == "zstd":
            yield from self._unzstd(data, max_out)
        elif data:
            yield data

    def finish(self) -> bytes:
        """Flush; raise CorruptLayer if the stream ended early (truncated layer)."""
        if self.compression == "gzip":
            try:
                tail = self._d.flush()
            except Exception as exc:
                raise CorruptLayer(f"gzip stream is corrupt: {exc}", layer=self.layer) from None
            if not self._d.eof:
                raise CorruptLayer("gzip stream is truncated", layer=self.layer)
            return tail
        if self.compression == "zstd":
            # eof of the last frame begun; a stream cut inside any frame ends up here
            if not self._zd.eof:
                raise CorruptLayer("zstd stream is truncated", layer=self.layer)
            return b""
        return b""


def decompress_chunks(chunks: Iterator[bytes], compression: str, *,
                      layer: str | None = None) -> Iterator[bytes]:
    """Yield uncompressed chunks from compressed ``chunks``; errors raise CorruptLayer."""
    d = Decompressor(compression, layer=layer)
    for chunk in chunks:
        yield from d.feed_bounded(chunk, CHUNK)
    tail = d.finish()
    if tail:
        yield tail


def read_file_chunks(path: str, size: int = CHUNK) -> Iterator[bytes]:
    """Yield a file's bytes in ``size`` chunks."""
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(size)
            if not b:
                return
            yield b
