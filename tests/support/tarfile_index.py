"""The tarfile-based layer indexer, kept as the reference the direct header parser in
:mod:`worker.cache.index` is checked against (tests/pull/test_index_differential.py).

It is the indexer as it was before the direct parser replaced it, unchanged but for its name:
the differential tests hold the new parser to exactly its entries and error classes.
"""

from __future__ import annotations

import base64
import hashlib
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from worker.cache.index import (
    MAX_EXTENDED_HEADER,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    EntryKind,
    IndexEntry,
    IndexLimits,
    TarIndex,
    normalize_path,
)
from worker.errors import (
    CorruptLayer,
    LayerError,
    LimitExceeded,
    RootfsExportError,
    UnsafeLayerEntry,
)

# tarfile's stream reader copies its whole buffer on every header read, so a big buffer is
# quadratic-ish on layers with many small files; 16 KiB measured best (bench: ~2x vs 1 MiB).
TAR_BUFSIZE = 1 << 14


def _join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent or ".", base


class ReferenceSpins(RuntimeError):
    """tarfile's stream seek reads a member's whole claimed size, in 16 KiB steps, even past
    the end of the stream: a header claiming 2**80 bytes would keep it busy forever. Raised
    here (an addition to the old code) so the comparison can finish."""


class _ChunkReader:
    """A read()-able view of an iterator of uncompressed chunks that hashes and counts bytes.

    ``tarfile`` pulls from it, so the whole pipeline (network, digest, temp file, decompression,
    indexing) runs in the caller's thread, one chunk at a time.
    """

    def __init__(self, chunks: Iterable[bytes], limits: IndexLimits, layer: str | None) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self._pos = 0
        self._limits = limits
        self._layer = layer
        self.sha = hashlib.sha256()
        self.total = 0
        #: one past the last non-zero byte seen (to check what follows the end of archive)
        self.last_nonzero = 0
        self._reads_at_end = 0

    def _pull(self) -> bool:
        for chunk in self._it:
            if not chunk:
                continue
            self.sha.update(chunk)
            start = self.total
            self.total += len(chunk)
            if self.total > self._limits.max_uncompressed_bytes:
                raise LimitExceeded("uncompressed layer size", self.total,
                                    self._limits.max_uncompressed_bytes,
                                    setting="ROOTFS_EXPORT_MAX_UNCOMPRESSED_BYTES",
                                    layer=self._layer)
            stripped = len(chunk.rstrip(b"\0"))
            if stripped:
                self.last_nonzero = start + stripped
            self._buf = chunk
            self._pos = 0
            return True
        return False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._pos:]]
            self._buf, self._pos = b"", 0
            while self._pull():
                parts.append(self._buf)
                self._buf = b""
            return b"".join(parts)
        out: list[bytes] = []
        while n > 0:
            if self._pos >= len(self._buf) and not self._pull():
                self._reads_at_end += 1
                if self._reads_at_end > 100_000:
                    raise ReferenceSpins("tarfile keeps reading past the end of the stream")
                break
            piece = self._buf[self._pos:self._pos + n]
            self._pos += len(piece)
            n -= len(piece)
            out.append(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def drain(self) -> None:
        self._buf, self._pos = b"", 0
        while self._pull():
            pass


_nti: Any = getattr(tarfile, "nti")  # noqa: B009 - private helper, untyped in typeshed


def _make_tarinfo_class(limits: IndexLimits, layer: str | None) -> type[tarfile.TarInfo]:
    ext_limit = max(MAX_EXTENDED_HEADER, 2 * limits.max_path_length)

    class _GuardedTarInfo(tarfile.TarInfo):
        # tarfile reads extended headers (PAX, GNU long names) wholly into memory: refuse
        # absurd sizes before it tries.
        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                             tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) \
                    and self.size > ext_limit:
                raise LimitExceeded("extended tar header size", self.size, ext_limit,
                                    setting="ROOTFS_EXPORT_MAX_PATH_LENGTH", layer=layer)
            if self.type == tarfile.XGLTYPE:
                # Global headers accumulate, and every later member copies them.
                held = sum(len(k) + len(v) for k, v in tf.pax_headers.items())
                if held + self.size > ext_limit:
                    raise LimitExceeded("global PAX header size", held + self.size, ext_limit,
                                        setting="ROOTFS_EXPORT_MAX_PATH_LENGTH", layer=layer)
            return super()._proc_member(tf)  # type: ignore[misc]

        # Old GNU sparse headers chain "extended" blocks; cap how many we follow.
        def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
            structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
            del self._sparse_structs  # type: ignore[attr-defined]
            fileobj: Any = tf.fileobj
            blocks = 0
            while isextended:
                blocks += 1
                if blocks * tarfile.BLOCKSIZE > ext_limit:
                    raise LimitExceeded("sparse map size", blocks * tarfile.BLOCKSIZE,
                                        ext_limit, setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                                        layer=layer, path=self.name)
                buf = fileobj.read(tarfile.BLOCKSIZE)
                if len(buf) < tarfile.BLOCKSIZE:
                    raise CorruptLayer("truncated sparse header", layer=layer, path=self.name)
                pos = 0
                for _ in range(21):
                    try:
                        offset = _nti(buf[pos:pos + 12])
                        numbytes = _nti(buf[pos + 12:pos + 24])
                    except ValueError:
                        break
                    if offset and numbytes:
                        structs.append((offset, numbytes))
                    pos += 24
                isextended = bool(buf[504])
            self.sparse = structs
            self.offset_data = fileobj.tell()
            tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
            self.size = origsize
            return self

        # tarfile's own version grows a buffer until it finds enough numbers: a hostile map
        # ("999999999999\n" then zeros) would make it read the whole stream into memory.
        def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                               tf: tarfile.TarFile) -> None:
            fileobj: Any = tf.fileobj
            buf = bytearray(fileobj.read(tarfile.BLOCKSIZE))
            used = len(buf)
            numbers: list[int] = []
            fields = -1
            while fields < 0 or len(numbers) < 2 * fields:
                while b"\n" not in buf:
                    if used >= ext_limit:
                        raise LimitExceeded("sparse map size", used, ext_limit,
                                            setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                                            layer=layer, path=next.name)
                    block = fileobj.read(tarfile.BLOCKSIZE)
                    if len(block) < tarfile.BLOCKSIZE:
                        raise CorruptLayer("truncated sparse map", layer=layer,
                                           path=next.name)
                    buf += block
                    used += len(block)
                end = buf.index(b"\n")
                value = int(buf[:end])
                del buf[:end + 1]
                if fields < 0:
                    fields = value
                else:
                    numbers.append(value)
            next.offset_data = fileobj.tell()
            next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))  # type: ignore[assignment]

    return _GuardedTarInfo


def _xattrs(ti: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    out: dict[str, bytes] = {}
    for key, value in (ti.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decoded the raw value as UTF-8 with surrogateescape: undo it exactly.
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
    return tuple(sorted(out.items()))


_TYPE_KINDS = {tarfile.REGTYPE: EntryKind.FILE, tarfile.AREGTYPE: EntryKind.FILE,
               tarfile.CONTTYPE: EntryKind.FILE, tarfile.GNUTYPE_SPARSE: EntryKind.FILE,
               tarfile.DIRTYPE: EntryKind.DIR, tarfile.SYMTYPE: EntryKind.SYMLINK,
               tarfile.LNKTYPE: EntryKind.HARDLINK, tarfile.CHRTYPE: EntryKind.CHAR,
               tarfile.BLKTYPE: EntryKind.BLOCK, tarfile.FIFOTYPE: EntryKind.FIFO}


def _entry(ti: tarfile.TarInfo, limits: IndexLimits, layer: str | None) -> IndexEntry | None:
    raw_name = ti.name
    if len(raw_name.encode("utf-8", "surrogateescape")) > limits.max_path_length:
        raise LimitExceeded("path length", len(raw_name.encode("utf-8", "surrogateescape")),
                            limits.max_path_length, setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                            layer=layer, path=raw_name[:200])
    kind = _TYPE_KINDS.get(ti.type)
    if kind is None:
        raise LayerError(f"unsupported tar entry type {ti.type!r}", layer=layer, path=raw_name)
    path = normalize_path(raw_name, layer=layer)
    parent, base = _split(path)
    base_kind = kind
    if base.startswith(WHITEOUT_PREFIX):
        if base == OPAQUE_MARKER:
            return IndexEntry(path=parent, kind=EntryKind.OPAQUE, mode=ti.mode & 0o7777,
                              uid=ti.uid, gid=ti.gid, mtime=float(ti.mtime),
                              header_offset=ti.offset, data_offset=ti.offset_data)
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return None  # reserved for other AUFS metadata: not part of the filesystem
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise UnsafeLayerEntry("whiteout names no valid entry", layer=layer, path=raw_name)
        return IndexEntry(path=_join(parent, target), kind=EntryKind.WHITEOUT,
                          mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid, mtime=float(ti.mtime),
                          header_offset=ti.offset, data_offset=ti.offset_data)
    if path == "." and kind is not EntryKind.DIR:
        raise UnsafeLayerEntry("the image root must be a directory", layer=layer, path=raw_name)
    linkname = ""
    if kind is EntryKind.SYMLINK:
        if "\0" in ti.linkname:
            raise UnsafeLayerEntry("symlink target contains a NUL byte", layer=layer,
                                   path=raw_name)
        if not ti.linkname:
            raise LayerError("symlink with an empty target (no filesystem can hold it)",
                             layer=layer, path=raw_name)
        linkname = ti.linkname
    elif kind is EntryKind.HARDLINK:
        linkname = normalize_path(ti.linkname, layer=layer, what="hardlink target")
        if linkname == ".":
            raise UnsafeLayerEntry("hardlink to the image root", layer=layer, path=raw_name)
    sparse: tuple[tuple[int, int], ...] | None = None
    size = ti.size if base_kind is EntryKind.FILE else 0
    data_size = size
    raw_sparse: Any = ti.sparse
    if raw_sparse is not None:
        sparse = tuple((int(o), int(n)) for o, n in raw_sparse)
        data_size = sum(n for _, n in sparse)
        end = 0
        for o, n in sparse:
            if o < 0 or n < 0 or o + n > size:
                raise CorruptLayer("sparse map points outside the file", layer=layer,
                                   path=raw_name)
            # the stored bytes fill the chunks in map order: a map that overlaps or runs
            # backwards has no single reading (each extractor would build another file);
            # empty chunks hold nothing (old GNU headers end with (size, 0) and unused slots)
            if n and o < end:
                raise CorruptLayer(f"sparse map chunks overlap or are out of order at offset {o}",
                                   layer=layer, path=raw_name)
            end = max(end, o + n)
    return IndexEntry(
        path=path, kind=kind, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
        mtime=float(ti.mtime), size=size, linkname=linkname,
        devmajor=ti.devmajor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        devminor=ti.devminor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        xattrs=_xattrs(ti), header_offset=ti.offset, data_offset=ti.offset_data,
        data_size=data_size, sparse=sparse)


def reference_index_tar_stream(chunks: Iterable[bytes], *, layer: str | None = None,
                     limits: IndexLimits | None = None) -> TarIndex:
    """Index an UNCOMPRESSED tar stream given as chunks, in one pass, without buffering it.

    Computes the diff_id (sha256 of every byte, including what follows the end-of-archive
    marker) and enforces ``limits`` as bytes arrive, so a decompression bomb fails fast. The
    iterator is consumed to its end. Errors name the layer (and path where known):
    :class:`UnsafeLayerEntry`, :class:`LimitExceeded`, :class:`CorruptLayer`.
    """
    limits = limits or IndexLimits()
    reader = _ChunkReader(chunks, limits, layer)
    entries: list[IndexEntry] = []
    members = 0
    end = 0
    try:
        tf = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - nothing to close
            fileobj=reader, mode="r|", bufsize=TAR_BUFSIZE,
            tarinfo=_make_tarinfo_class(limits, layer),
            errors="surrogateescape", encoding="utf-8")
    except RootfsExportError:
        raise
    except tarfile.ReadError as exc:
        reader.drain()
        if reader.total == 0:
            return TarIndex((), "sha256:" + reader.sha.hexdigest(), 0)
        raise CorruptLayer(f"not a tar archive: {exc}", layer=layer) from None
    try:
        while True:
            ti = tf.next()
            # Stream mode keeps every member in tf.members; drop them (2M entries add up).
            tf.members.clear()
            if ti is None:
                end = tf.offset
                break
            members += 1
            if members > limits.max_entries:
                raise LimitExceeded("entry count", members, limits.max_entries,
                                    setting="ROOTFS_EXPORT_MAX_ENTRIES", layer=layer)
            entry = _entry(ti, limits, layer)
            if entry is not None:
                entries.append(entry)
    except RootfsExportError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OverflowError, IndexError) as exc:
        raise CorruptLayer(f"tar stream is malformed: {exc}", layer=layer) from None
    reader.drain()
    if reader.total < end:
        raise CorruptLayer("tar stream is truncated", layer=layer)
    if reader.last_nonzero > end:
        raise CorruptLayer(f"unreadable tar header or garbage at offset {end} of the "
                           "uncompressed stream", layer=layer)
    return TarIndex(tuple(entries), "sha256:" + reader.sha.hexdigest(), reader.total)


# -- comparing the two indexers ------------------------------------------------------------------

Outcome = tuple[Any, ...]
_LAYER = "sha256:" + "d" * 64


def _outcome(fn: Any, data: bytes, chunk_size: int, limits: IndexLimits) -> Outcome:
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    try:
        result = fn(chunks, layer=_LAYER, limits=limits)
    except LayerError as exc:
        return ("error", type(exc).__name__, getattr(exc, "setting", None),
                getattr(exc, "what", None), exc.layer)
    except RootfsExportError as exc:
        return ("error", type(exc).__name__)
    except (ValueError, RecursionError, ReferenceSpins) as exc:
        # tarfile lets these escape for a few malformed first members and for very long
        # chains of extended headers, or never ends: the parser must call them corrupt
        return ("crash", type(exc).__name__, str(exc)[:200])
    return ("ok", result.entries, result.diff_id, result.uncompressed_size)


def index_outcomes(data: bytes, *, chunk_size: int = 777,
                   limits: IndexLimits | None = None) -> tuple[Outcome, Outcome]:
    """What the direct parser and the tarfile reference make of ``data``: (new, reference)."""
    from worker.cache.index import index_tar_stream

    limits = limits or IndexLimits()
    return (_outcome(index_tar_stream, data, chunk_size, limits),
            _outcome(reference_index_tar_stream, data, chunk_size, limits))


def assert_same_index(data: bytes, *, chunk_size: int = 777,
                      limits: IndexLimits | None = None) -> Outcome:
    """Fail unless both indexers give the same entries, diff_id and size, or the same error
    class (and limit setting); returns the parser's outcome."""
    new, old = index_outcomes(data, chunk_size=chunk_size, limits=limits)
    if old[0] == "crash":
        assert new[:2] == ("error", "CorruptLayer"), \
            f"reference raised {old[1]} ({old[2]}); the parser gave {new[:2]}"
        return new
    if new != old and new[0] == old[0] == "ok":
        for a, b in zip(new[1], old[1], strict=False):
            assert a == b, f"first differing entry:\n parser:    {a}\n reference: {b}"
    assert new == old, f"parser: {str(new)[:600]}\nreference: {str(old)[:600]}"
    return new
