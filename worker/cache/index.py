"""The compact per-layer entry index, built while a layer streams in.

Later stages plan the flattening and size the ext4 image from these indexes alone, without
decompressing anything; data is read once, at apply time, by ``header_offset``/``data_offset``
in the uncompressed stream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

import zstandard

from worker.errors import (
    CorruptLayer,
    LayerError,
    LimitExceeded,
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
        doc = json.loads(zstandard.ZstdDecompressor().decompress(data,
                                                                 max_output_size=1 << 34))
        if doc.get(_MAGIC_KEY) != INDEX_FORMAT:
            raise ValueError(f"unknown index format {doc.get(_MAGIC_KEY)!r}")
        # each parsed record is dropped as soon as it became an entry: the dicts of a 100k-entry
        # layer would otherwise double its memory while the entries are built
        objs: list[Any] = doc.pop("e")
        entries = []
        for i, o in enumerate(objs):
            entries.append(_entry_from_obj(o))
            objs[i] = None
        return LayerIndex(digest=doc["d"], diff_id=doc["i"], media_type=doc["m"],
                          compression=doc["c"], compressed_size=doc["cs"],
                          uncompressed_size=doc["us"], entries=tuple(entries))
    except (zstandard.ZstdError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptLayer(f"layer index is corrupt: {exc}") from None


# -- indexing a tar stream ---------------------------------------------------------------------

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: largest PAX / GNU long-name header we read into memory (a bomb could claim gigabytes)
MAX_EXTENDED_HEADER = 1 << 20
#: extended headers (PAX, GNU long name/link) allowed in front of one member; real archives use
#: at most three (x, L, K), and each one is held in memory until the member is read
MAX_EXTENDED_CHAIN = 32


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


class _Reader:
    """The uncompressed stream as absolute positions over an iterator of chunks.

    Every chunk is hashed and counted once, when it is pulled. Headers are sliced out of the
    current chunk; member data is skipped by moving the position, so data bytes are never
    copied or read in small pieces.
    """

    __slots__ = ("_it", "_buf", "_base", "pos", "total", "sha", "_limit", "_layer")

    def __init__(self, chunks: Iterable[bytes], limits: IndexLimits, layer: str | None) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self._base = 0          # stream offset of _buf[0]; _base + len(_buf) == total
        self.pos = 0
        self.total = 0
        self.sha = hashlib.sha256()
        self._limit = limits.max_uncompressed_bytes
        self._layer = layer

    def _pull(self) -> bool:
        for chunk in self._it:
            if not chunk:
                continue
            self.sha.update(chunk)
            self._base = self.total
            self.total += len(chunk)
            if self.total > self._limit:
                raise LimitExceeded("uncompressed layer size", self.total, self._limit,
                                    setting="ROOTFS_EXPORT_MAX_UNCOMPRESSED_BYTES",
                                    layer=self._layer)
            self._buf = chunk
            return True
        return False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        off = self.pos - self._base
        buf = self._buf
        if off + n <= len(buf):
            self.pos += n
            return buf[off:off + n]
        parts = [buf[off:]]
        got = len(buf) - off
        while got < n and self._pull():
            piece = self._buf[:n - got]
            parts.append(piece)
            got += len(piece)
        self.pos += got
        return b"".join(parts)

    def seek(self, target: int) -> bool:
        """Move forward to ``target``; False when the stream ends before it."""
        while self.total < target:
            if not self._pull():
                self.pos = self.total
                return False
        self.pos = target
        return True

    def drain(self) -> bool:
        """Consume the rest of the stream; True when a non-zero byte follows the position."""
        off = self.pos - self._base
        nonzero = self._buf.count(0, off) != len(self._buf) - off
        while self._pull():
            if not nonzero:
                nonzero = self._buf.count(0) != len(self._buf)
        self.pos = self.total
        return nonzero


# -- the tar format ----------------------------------------------------------------------------
# What follows reads headers exactly as CPython's tarfile module (3.11) does in stream mode
# ("r|"), which the indexer used before: the same numeric field rules (octal with NUL/space
# padding, base-256), the same handling of PAX records, GNU long names and the four GNU sparse
# formats, the same end-of-archive rules. tests/support/tarfile_index.py keeps the tarfile-based
# indexer and tests/pull/test_index_differential.py holds this parser to its results.

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE = b"L", b"K", b"S"
XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE = b"x", b"g", b"X"
_REGULAR_TYPES = frozenset((REGTYPE, AREGTYPE, CONTTYPE, GNUTYPE_SPARSE))
_SUPPORTED_TYPES = _REGULAR_TYPES | {LNKTYPE, SYMTYPE, DIRTYPE, FIFOTYPE, CHRTYPE, BLKTYPE,
                                     GNUTYPE_LONGNAME, GNUTYPE_LONGLINK}
_EXTENDED_TYPES = frozenset((GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, XHDTYPE, XGLTYPE,
                             SOLARIS_XHDTYPE))
_GNU_TYPES = frozenset((GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE))
_PAX_NUMBER_FIELDS: dict[str, Callable[[str], float]] = {"mtime": float, "uid": int,
                                                        "gid": int, "size": int}
_PAX_STR_FIELDS = {"path": "name", "linkpath": "linkname"}
_PAX_IGNORED_FIELDS = frozenset(("uname", "gname"))
_PAX_RECORD_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_NO_PAX: dict[str, str] = {}


class _HeaderError(Exception):
    """A header block that cannot start a member (tarfile's HeaderError family)."""


class _EmptyHeader(_HeaderError):
    pass


class _TruncatedHeader(_HeaderError):
    def __init__(self, data: bytes) -> None:
        super().__init__("truncated header")
        self.nonzero = data.count(0) != len(data)


class _EOFHeader(_HeaderError):
    pass


class _InvalidHeader(_HeaderError):
    pass


class _SubsequentHeader(_HeaderError):
    """A header error after an extended header: the archive is broken, not just ending."""


def _block(count: int) -> int:
    """``count`` rounded up to whole blocks (negative sizes round as tarfile's do)."""
    return (count + BLOCK - 1) // BLOCK * BLOCK


def _nti(field: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256."""
    first = field[0]
    if first == 0o200 or first == 0o377:
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if first == 0o377 else n
    raw = field
    nul = field.find(0)
    if nul != -1:
        field = field[:nul]
    try:
        n = int(field.decode("ascii").strip() or "0", 8)
    except ValueError:
        raise _InvalidHeader("invalid header") from None
    if len(_NUMBERS) < _NUMBERS_MAX:
        _NUMBERS[raw] = n
    return n


#: numeric fields seen before (modes, ids, device numbers repeat across headers)
_NUMBERS: dict[bytes, int] = {}
_NUMBERS_MAX = 1 << 16
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32x32x8s8s155s")


def _nts(field: bytes) -> str:
    nul = field.find(0)
    if nul != -1:
        field = field[:nul]
    return field.decode("utf-8", "surrogateescape")


class _Member:
    """One member's header fields, as tarfile's TarInfo would hold them after processing."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
                 "devmajor", "devminor", "offset", "offset_data", "sparse", "pax_headers",
                 "sparse_structs")

    def __init__(self, hdr: bytes) -> None:
        """Parse one 512-byte header block (checksum checked, not all zeros)."""
        (name_f, mode, uid, gid, size, mtime, _, kind, link_f, major, minor,
         prefix_f) = _HEADER.unpack_from(hdr)
        numbers = _NUMBERS
        self.mode = numbers[mode] if mode in numbers else _nti(mode)
        self.uid = numbers[uid] if uid in numbers else _nti(uid)
        self.gid = numbers[gid] if gid in numbers else _nti(gid)
        self.size = numbers[size] if size in numbers else _nti(size)
        self.mtime: float = numbers[mtime] if mtime in numbers else _nti(mtime)
        self.type = kind
        self.linkname = _nts(link_f) if link_f[0] else ""
        self.devmajor = numbers[major] if major in numbers else _nti(major)
        self.devminor = numbers[minor] if minor in numbers else _nti(minor)
        name = _nts(name_f)
        prefix = _nts(prefix_f) if prefix_f[0] else ""
        # Old V7 tar marks a directory by a trailing slash on a regular file.
        if kind == AREGTYPE and name.endswith("/"):
            self.type = kind = DIRTYPE
        self.sparse: list[tuple[int, int]] | None = None
        self.pax_headers = _NO_PAX
        self.offset = self.offset_data = 0
        self.sparse_structs: tuple[list[tuple[int, int]], bool, int] | None = None
        if kind == GNUTYPE_SPARSE:
            # Old GNU sparse: four (offset, size) slots in the header, more in blocks after it.
            structs = [(_nti(hdr[pos:pos + 12]), _nti(hdr[pos + 12:pos + 24]))
                       for pos in range(386, 482, 24)]
            self.sparse_structs = (structs, bool(hdr[482]), _nti(hdr[483:495]))
        if kind == DIRTYPE:
            name = name.rstrip("/")
        if prefix and kind not in _GNU_TYPES:
            name = prefix + "/" + name
        self.name = name

    def isreg(self) -> bool:
        return self.type in _REGULAR_TYPES

    def apply_pax(self, pax: dict[str, str]) -> None:
        """Let PAX records override header fields (tarfile's ``_apply_pax_info``)."""
        for key, value in pax.items():
            if key == "GNU.sparse.name":
                self.name = value
            elif key == "GNU.sparse.size" or key == "GNU.sparse.realsize":
                self.size = int(value)
            elif key in _PAX_NUMBER_FIELDS:
                try:
                    number = _PAX_NUMBER_FIELDS[key](value)
                except ValueError:
                    number = 0
                if key == "mtime":
                    self.mtime = number
                else:
                    setattr(self, key, number)
            elif key == "path":
                self.name = value.rstrip("/")
            elif key == "linkpath":
                self.linkname = value
        self.pax_headers = dict(pax) if pax else _NO_PAX


def _checksum_ok(hdr: bytes) -> bool:
    field = hdr[148:156]
    stored = _nti(field)
    unsigned = 256 + sum(hdr) - sum(field)
    if stored == unsigned:
        return True
    # Some old tars (Sun, NeXT) summed signed chars.
    high = sum(1 for b in hdr if b >= 0x80) - sum(1 for b in field if b >= 0x80)
    return stored == unsigned - 256 * high


class _TarParser:
    """Walks the headers of one uncompressed tar stream (see :func:`index_tar_stream`)."""

    def __init__(self, reader: _Reader, limits: IndexLimits, layer: str | None) -> None:
        self.r = reader
        self.limits = limits
        self.layer = layer
        self.ext_limit = max(MAX_EXTENDED_HEADER, 2 * limits.max_path_length)
        self.global_pax: dict[str, str] = {}
        self.offset = 0     # where the next header starts

    def header(self) -> _Member:
        hdr = self.r.read(BLOCK)
        if len(hdr) != BLOCK:
            if not hdr:
                raise _EmptyHeader("empty header")
            raise _TruncatedHeader(hdr)
        if hdr == _ZERO_BLOCK:
            raise _EOFHeader("end of file header")
        if not _checksum_ok(hdr):
            raise _InvalidHeader("bad checksum")
        return _Member(hdr)

    def member(self) -> _Member:
        """The next member with its extended headers applied; header errors of the first
        block come out as they are, later ones as :class:`_SubsequentHeader`."""
        r = self.r
        chain: list[tuple[_Member, bytes, dict[str, str] | None,
                          list[tuple[bytes, bytes]]]] = []
        while True:
            start = r.pos
            try:
                m = self.header()
                m.offset = start
                kind = m.type
                if kind not in _EXTENDED_TYPES:
                    if kind == GNUTYPE_SPARSE:
                        self.proc_sparse(m)
                    else:
                        self.proc_builtin(m)
                    break
                self.guard(m)
                if len(chain) >= MAX_EXTENDED_CHAIN:
                    raise CorruptLayer(f"more than {MAX_EXTENDED_CHAIN} extended headers in a "
                                       "row", layer=self.layer)
                if m.size < 0:
                    raise CorruptLayer("extended tar header with a negative size",
                                       layer=self.layer)
                data = r.read(_block(m.size))
                if kind in (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK):
                    chain.append((m, data, None, []))
                else:
                    records, raw = self.parse_pax(kind, data)
                    chain.append((m, b"", records, raw))
            except _HeaderError as exc:
                if chain:
                    raise _SubsequentHeader(str(exc)) from None
                raise
        # Extended headers act on the member from the innermost outwards, as tarfile's
        # recursion does (so the first of two long-name headers wins).
        for level in range(len(chain) - 1, -1, -1):
            ext, data, pax, raw = chain[level]
            try:
                if pax is None:
                    self.apply_gnulong(ext, data, m)
                else:
                    self.apply_pax_header(ext, pax, raw, m)
            except _HeaderError as exc:
                if level:
                    raise _SubsequentHeader(str(exc)) from None
                raise
        return m

    def guard(self, m: _Member) -> None:
        # Extended headers are held in memory: refuse absurd sizes before reading them.
        if m.size > self.ext_limit:
            raise LimitExceeded("extended tar header size", m.size, self.ext_limit,
                                setting="ROOTFS_EXPORT_MAX_PATH_LENGTH", layer=self.layer)
        if m.type == XGLTYPE:
            # Global headers accumulate, and every later member copies them.
            held = sum(len(k) + len(v) for k, v in self.global_pax.items())
            if held + m.size > self.ext_limit:
                raise LimitExceeded("global PAX header size", held + m.size, self.ext_limit,
                                    setting="ROOTFS_EXPORT_MAX_PATH_LENGTH", layer=self.layer)

    def proc_builtin(self, m: _Member) -> None:
        m.offset_data = offset = self.r.pos
        if m.type in _REGULAR_TYPES or m.type not in _SUPPORTED_TYPES:
            offset += _block(m.size)
        self.offset = offset
        if self.global_pax:
            m.apply_pax(self.global_pax)
        if m.type == DIRTYPE:
            # again: the ustar prefix or a global path may have brought a trailing slash back
            m.name = m.name.rstrip("/")

    def proc_sparse(self, m: _Member) -> None:
        assert m.sparse_structs is not None
        structs, extended, origsize = m.sparse_structs
        m.sparse_structs = None
        blocks = 0
        while extended:
            blocks += 1
            # Each extension block may announce another: cap how many we follow.
            if blocks * BLOCK > self.ext_limit:
                raise LimitExceeded("sparse map size", blocks * BLOCK, self.ext_limit,
                                    setting="ROOTFS_EXPORT_MAX_PATH_LENGTH", layer=self.layer,
                                    path=m.name)
            buf = self.r.read(BLOCK)
            if len(buf) < BLOCK:
                raise CorruptLayer("truncated sparse header", layer=self.layer, path=m.name)
            for pos in range(0, 504, 24):
                offset, numbytes = _nti(buf[pos:pos + 12]), _nti(buf[pos + 12:pos + 24])
                if offset and numbytes:
                    structs.append((offset, numbytes))
            extended = bool(buf[504])
        m.sparse = structs
        m.offset_data = self.r.pos
        self.offset = m.offset_data + _block(m.size)
        m.size = origsize

    def parse_pax(self, kind: bytes,
                  buf: bytes) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
        """Read the records of a PAX header; a global one updates the global records."""
        pax = self.global_pax if kind == XGLTYPE else self.global_pax.copy()
        raw: list[tuple[bytes, bytes]] = []
        pos = 0
        while len(buf) > pos and buf[pos] != 0:
            match = _PAX_RECORD_LENGTH.match(buf, pos)
            if not match:
                raise _InvalidHeader("invalid header")
            length = int(match.group(1))
            # "%d %s=%s\n": at least 5 bytes ("5 x=\n"), within the header
            if length < 5 or pos + length > len(buf):
                raise _InvalidHeader("invalid header")
            last = match.start(1) + length - 1
            keyword, equals, value = buf[match.end(1) + 1:last].partition(b"=")
            if not keyword or equals != b"=" or buf[last] != 0x0A:
                raise _InvalidHeader("invalid header")
            raw.append((keyword, value))
            pos += length
        for keyword, value in raw:
            # hdrcharset=BINARY changes nothing: names are UTF-8 with surrogateescape anyway.
            pax[keyword.decode("utf-8", "surrogateescape")] = \
                value.decode("utf-8", "surrogateescape")
        return pax, raw

    def apply_gnulong(self, ext: _Member, data: bytes, m: _Member) -> None:
        m.offset = ext.offset
        if ext.type == GNUTYPE_LONGNAME:
            m.name = _nts(data)
        else:
            m.linkname = _nts(data)
        if m.type == DIRTYPE:
            m.name = m.name.removesuffix("/")

    def apply_pax_header(self, ext: _Member, pax: dict[str, str],
                         raw: list[tuple[bytes, bytes]], m: _Member) -> None:
        if "GNU.sparse.map" in pax:
            # GNU sparse 0.1: "offset,size,offset,size,..."
            numbers = [int(x) for x in pax["GNU.sparse.map"].split(",")]
            m.sparse = list(zip(numbers[::2], numbers[1::2], strict=False))
        elif "GNU.sparse.size" in pax:
            # GNU sparse 0.0: repeated offset / numbytes records, in order
            offsets: list[int] = []
            sizes: list[int] = []
            for keyword, value in raw:
                if keyword == b"GNU.sparse.offset" or keyword == b"GNU.sparse.numbytes":
                    try:
                        number = int(value.decode())
                    except ValueError:
                        raise _InvalidHeader("invalid header") from None
                    (offsets if keyword == b"GNU.sparse.offset" else sizes).append(number)
            m.sparse = list(zip(offsets, sizes, strict=False))
        elif pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
            self.sparse_map_10(m)
        if ext.type != XGLTYPE:
            m.apply_pax(pax)
            m.offset = ext.offset
            if "size" in pax:
                offset = m.offset_data
                if m.type in _REGULAR_TYPES or m.type not in _SUPPORTED_TYPES:
                    offset += _block(m.size)
                self.offset = offset

    def sparse_map_10(self, m: _Member) -> None:
        """GNU sparse 1.0: the map is decimal lines at the start of the member's data."""
        r = self.r
        buf = bytearray(r.read(BLOCK))
        used = len(buf)
        numbers: list[int] = []
        fields = -1
        # A hostile map ("999999999999\n" then zeros) must not read the stream into memory.
        while fields < 0 or len(numbers) < 2 * fields:
            while b"\n" not in buf:
                if used >= self.ext_limit:
                    raise LimitExceeded("sparse map size", used, self.ext_limit,
                                        setting="ROOTFS_EXPORT_MAX_PATH_LENGTH",
                                        layer=self.layer, path=m.name)
                block = r.read(BLOCK)
                if len(block) < BLOCK:
                    raise CorruptLayer("truncated sparse map", layer=self.layer, path=m.name)
                buf += block
                used += len(block)
            end = buf.index(b"\n")
            value = int(buf[:end])
            del buf[:end + 1]
            if fields < 0:
                fields = value
            else:
                numbers.append(value)
        m.offset_data = r.pos
        m.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


def _xattrs(pax: dict[str, str]) -> tuple[tuple[str, bytes], ...]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            # The value was decoded as UTF-8 with surrogateescape: undo it exactly.
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
    return tuple(sorted(out.items()))


_TYPE_KINDS = {REGTYPE: EntryKind.FILE, AREGTYPE: EntryKind.FILE, CONTTYPE: EntryKind.FILE,
               GNUTYPE_SPARSE: EntryKind.FILE, DIRTYPE: EntryKind.DIR,
               SYMTYPE: EntryKind.SYMLINK, LNKTYPE: EntryKind.HARDLINK,
               CHRTYPE: EntryKind.CHAR, BLKTYPE: EntryKind.BLOCK, FIFOTYPE: EntryKind.FIFO}


def _entry(ti: _Member, limits: IndexLimits, layer: str | None) -> IndexEntry | None:
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
    size = ti.size if kind is EntryKind.FILE else 0
    data_size = size
    if ti.sparse is not None:
        sparse = tuple((int(o), int(n)) for o, n in ti.sparse)
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
    device = kind is EntryKind.CHAR or kind is EntryKind.BLOCK
    return IndexEntry(
        path=path, kind=kind, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
        mtime=float(ti.mtime), size=size, linkname=linkname,
        devmajor=ti.devmajor if device else 0, devminor=ti.devminor if device else 0,
        xattrs=_xattrs(ti.pax_headers) if ti.pax_headers else (),
        header_offset=ti.offset, data_offset=ti.offset_data, data_size=data_size,
        sparse=sparse)


def index_tar_stream(chunks: Iterable[bytes], *, layer: str | None = None,
                     limits: IndexLimits | None = None) -> TarIndex:
    """Index an UNCOMPRESSED tar stream given as chunks, in one pass, without buffering it.

    Computes the diff_id (sha256 of every byte, including what follows the end-of-archive
    marker) and enforces ``limits`` as bytes arrive, so a decompression bomb fails fast. The
    iterator is consumed to its end. Errors name the layer (and path where known):
    :class:`UnsafeLayerEntry`, :class:`LimitExceeded`, :class:`CorruptLayer`.
    """
    limits = limits or IndexLimits()
    reader = _Reader(chunks, limits, layer)
    parser = _TarParser(reader, limits, layer)
    entries: list[IndexEntry] = []
    members = 0
    garbage = False     # a non-zero byte at or after the end of the archive
    while True:
        offset = parser.offset
        if offset != reader.pos:
            if offset == 0:
                # Only a negative member size leads back here: the archive ends at a member.
                end, garbage = 0, True
                break
            if offset < reader.pos:
                raise CorruptLayer("tar stream is malformed: a member size points backwards",
                                   layer=layer)
            if not reader.seek(offset):
                raise CorruptLayer("tar stream is malformed: unexpected end of data",
                                   layer=layer)
        try:
            member = parser.member()
        except _EOFHeader:
            end = offset
            break
        except _EmptyHeader:
            if offset == 0:
                return TarIndex((), "sha256:" + reader.sha.hexdigest(), 0)
            end = offset
            break
        except _SubsequentHeader as exc:
            if offset == 0:
                _not_a_tar(reader, exc, layer)
            raise CorruptLayer(f"tar stream is malformed: {exc}", layer=layer) from None
        except _TruncatedHeader as exc:
            if offset == 0:
                _not_a_tar(reader, exc, layer)
            end, garbage = offset, exc.nonzero
            break
        except _InvalidHeader as exc:
            if offset == 0:
                _not_a_tar(reader, exc, layer)
            # The archive ends where the next header was expected. That is the bad block
            # itself, unless a GNU sparse 0.0 map failed after its member was already read.
            end = parser.offset
            if end == offset or end < reader.pos:
                garbage = True
            elif not reader.seek(end):
                raise CorruptLayer("tar stream is truncated", layer=layer) from None
            break
        except (ValueError, OverflowError, IndexError) as exc:
            raise CorruptLayer(f"tar stream is malformed: {exc}", layer=layer) from None
        members += 1
        if members > limits.max_entries:
            raise LimitExceeded("entry count", members, limits.max_entries,
                                setting="ROOTFS_EXPORT_MAX_ENTRIES", layer=layer)
        entry = _entry(member, limits, layer)
        if entry is not None:
            entries.append(entry)
    garbage = reader.drain() or garbage
    if garbage:
        raise CorruptLayer(f"unreadable tar header or garbage at offset {end} of the "
                           "uncompressed stream", layer=layer)
    return TarIndex(tuple(entries), "sha256:" + reader.sha.hexdigest(), reader.total)


def _not_a_tar(reader: _Reader, exc: Exception, layer: str | None) -> NoReturn:
    reader.drain()
    raise CorruptLayer(f"not a tar archive: {exc}", layer=layer)
