"""The compact per-layer entry index, built while a layer streams in.

Later stages plan the flattening and size the ext4 image from these indexes alone, without
decompressing anything; data is read once, at apply time, by ``header_offset``/``data_offset``
in the uncompressed stream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import zstandard

from worker.errors import (
    CorruptLayer,
    LayerError,
    LimitExceeded,
    RootfsExportError,
    UnsafeLayerEntry,
)


class EntryKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"   # ``dir/.wh.NAME``: path is ``dir/NAME`` (the thing deleted)
    OPAQUE = "opaque"       # ``dir/.wh..wh..opq``: path is ``dir``


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One tar member of one layer, normalised.

    ``path`` is relative to the image root, without ``./``, leading ``/`` or trailing ``/``;
    the root itself is ``"."``. Names are ``str`` decoded with ``surrogateescape`` so that
    non-UTF-8 bytes round-trip (``os.fsencode(path)`` gives the original bytes). Lexical ``..``
    has been resolved; a name climbing above the root never reaches an index (it is an
    :class:`~worker.errors.UnsafeLayerEntry` at indexing time). Symlinked parents are NOT
    resolved here: that needs the tree of all lower layers and is the planner's job.
    """

    path: str
    kind: EntryKind
    mode: int = 0o644              # permission bits incl. setuid/setgid/sticky, no type bits
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    size: int = 0                  # apparent file size (sparse files: the full size)
    linkname: str = ""             # symlink target as written; hardlink target, normalised
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    header_offset: int = 0         # first header block (incl. PAX/GNU extended headers)
    data_offset: int = 0           # first data byte in the uncompressed stream
    data_size: int = 0             # bytes stored in the archive (< size for sparse files)
    sparse: tuple[tuple[int, int], ...] | None = None   # (offset, length) data chunks


@dataclass(frozen=True, slots=True)
class LayerIndex:
    """Everything known about one layer blob after it was fetched and verified."""

    digest: str                    # compressed blob digest (the descriptor's)
    diff_id: str                   # sha256 of the uncompressed tar
    media_type: str
    compression: str               # "gzip" | "zstd" | "none" (sniffed from magic bytes)
    compressed_size: int
    uncompressed_size: int
    entries: tuple[IndexEntry, ...]


# -- storage format ------------------------------------------------------------------------
# zstd-compressed JSON with one-letter keys, defaults omitted. ``ensure_ascii`` turns the lone
# surrogates of non-UTF-8 names into \udcXX escapes that json.loads turns back into the same
# surrogates, so names round-trip byte for byte; xattr values are base64.

INDEX_FORMAT = 1
_MAGIC_KEY = "rootfs-export-index"
_KIND_CODES = {EntryKind.FILE: "f", EntryKind.DIR: "d", EntryKind.SYMLINK: "s",
               EntryKind.HARDLINK: "h", EntryKind.CHAR: "c", EntryKind.BLOCK: "b",
               EntryKind.FIFO: "p", EntryKind.WHITEOUT: "w", EntryKind.OPAQUE: "o"}
_CODE_KINDS = {v: k for k, v in _KIND_CODES.items()}
_DEFAULTS = IndexEntry(path=".", kind=EntryKind.FILE)


def _entry_to_obj(e: IndexEntry) -> dict[str, Any]:
    o: dict[str, Any] = {"p": e.path, "k": _KIND_CODES[e.kind]}
    if e.mode != _DEFAULTS.mode:
        o["m"] = e.mode
    _put_set(o, u=e.uid, g=e.gid)
    if e.mtime:
        o["t"] = int(e.mtime) if float(e.mtime).is_integer() else e.mtime
    _put_set(o, s=e.size, l=e.linkname, M=e.devmajor, N=e.devminor)
    if e.xattrs:
        o["x"] = [[k, base64.b64encode(v).decode("ascii")] for k, v in e.xattrs]
    o["h"] = e.header_offset
    _put_set(o, o=e.data_offset, z=e.data_size)
    if e.sparse is not None:
        o["S"] = [list(c) for c in e.sparse]
    return o


def _put_set(obj: dict[str, Any], /, **values: int | str) -> None:
    """Store each value that is not zero or empty under its key, in order (unset ones are
    the defaults :func:`_entry_from_obj` restores)."""
    for key, value in values.items():
        if value:
            obj[key] = value


def _entry_from_obj(o: dict[str, Any]) -> IndexEntry:
    sparse = o.get("S")
    return IndexEntry(
        path=o["p"], kind=_CODE_KINDS[o["k"]], mode=o.get("m", _DEFAULTS.mode),
        uid=o.get("u", 0), gid=o.get("g", 0), mtime=float(o.get("t", 0)), size=o.get("s", 0),
        linkname=o.get("l", ""), devmajor=o.get("M", 0), devminor=o.get("N", 0),
        xattrs=tuple((k, base64.b64decode(v)) for k, v in o.get("x", ())),
        header_offset=o.get("h", 0), data_offset=o.get("o", 0), data_size=o.get("z", 0),
        sparse=tuple((int(a), int(b)) for a, b in sparse) if sparse is not None else None)


def dump_index(index: LayerIndex) -> bytes:
    """Serialise ``index`` for storage beside its blob."""
    doc = {_MAGIC_KEY: INDEX_FORMAT, "d": index.digest, "i": index.diff_id,
           "m": index.media_type, "c": index.compression, "cs": index.compressed_size,
           "us": index.uncompressed_size, "e": [_entry_to_obj(e) for e in index.entries]}
    raw = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return zstandard.ZstdCompressor(level=3).compress(raw)


def load_index(data: bytes) -> LayerIndex:
    """Inverse of :func:`dump_index`; raises CorruptLayer on malformed data."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
        doc = json.loads(raw)
        if doc.get(_MAGIC_KEY) != INDEX_FORMAT:
            raise ValueError(f"unknown index format {doc.get(_MAGIC_KEY)!r}")
        return LayerIndex(digest=doc["d"], diff_id=doc["i"], media_type=doc["m"],
                          compression=doc["c"], compressed_size=doc["cs"],
                          uncompressed_size=doc["us"],
                          entries=tuple(_entry_from_obj(o) for o in doc["e"]))
    except (zstandard.ZstdError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptLayer(f"layer index is corrupt: {exc}") from None


# -- indexing a tar stream ---------------------------------------------------------------------

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: largest PAX / GNU long-name header we read into memory (a bomb could claim gigabytes)
MAX_EXTENDED_HEADER = 1 << 20
# tarfile's stream reader copies its whole buffer on every header read, so a big buffer is
# quadratic-ish on layers with many small files; 16 KiB measured best (bench: ~2x vs 1 MiB).
TAR_BUFSIZE = 1 << 14


@dataclass(frozen=True, slots=True)
class IndexLimits:
    max_uncompressed_bytes: int = 64 << 30
    max_entries: int = 2_000_000
    max_path_length: int = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> IndexLimits:
        return cls(settings.max_uncompressed_bytes, settings.max_entries,
                   settings.max_path_length)


@dataclass(frozen=True, slots=True)
class TarIndex:
    """What :func:`index_tar_stream` learned from one uncompressed layer stream."""

    entries: tuple[IndexEntry, ...]
    diff_id: str
    uncompressed_size: int


def normalize_path(name: str, *, layer: str | None = None, what: str = "entry") -> str:
    """Normalise a tar member name: no ``./``, leading or trailing ``/``; ``..`` resolved.

    The root is ``"."``. Raises :class:`UnsafeLayerEntry` for a name that climbs above the
    root or contains NUL.
    """
    if "\0" in name:
        raise UnsafeLayerEntry(f"{what} name contains a NUL byte", layer=layer, path=name)
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafeLayerEntry(f"{what} name climbs above the image root",
                                       layer=layer, path=name)
            parts.pop()
            continue
        parts.append(comp)
    return "/".join(parts) if parts else "."


def _join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent or ".", base


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
        for o, n in sparse:
            if o < 0 or n < 0 or o + n > size:
                raise CorruptLayer("sparse map points outside the file", layer=layer,
                                   path=raw_name)
    return IndexEntry(
        path=path, kind=kind, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
        mtime=float(ti.mtime), size=size, linkname=linkname,
        devmajor=ti.devmajor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        devminor=ti.devminor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        xattrs=_xattrs(ti), header_offset=ti.offset, data_offset=ti.offset_data,
        data_size=data_size, sparse=sparse)


def index_tar_stream(chunks: Iterable[bytes], *, layer: str | None = None,
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
