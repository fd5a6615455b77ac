"""Write a plan as one flattened PAX tar stream (file, pipe or stdout).

Order, chosen so that every consumer can extract it in one pass and each layer blob is read
once, front to back:

1. every entry without data (directories, symlinks, devices, FIFOs, empty files), in tree
   order: every directory, implied ones included, comes before its children (directories
   with u+rwx added here, so that an unprivileged extractor can fill read-only ones);
2. regular files with data, layer by layer, in the order their bytes sit in the layer;
3. hardlinks, whose targets all exist by then;
4. every directory again, deepest first, with its exact metadata: extractors take a
   directory's mode and mtime from its last entry, after its children were written (GNU tar
   and ``mke2fs -d -`` both do).

Headers are PAX with numeric ids only (no user/group names: ownership must not depend on the
host's passwd), xattrs as ``SCHILY.xattr.*``, sparse files as GNU sparse 1.0 (holes stay holes).
A regular file whose original header already says exactly that (same name, plain ustar block,
no names) is copied through byte for byte. GNU tar, libarchive and ``mke2fs -d -`` read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from worker.cache.index import EntryKind, IndexEntry
from worker.errors import Canceled, CorruptLayer, PackagingError
from worker.flatten.plan import FlatPlan, PlannedEntry
from worker.flatten.reader import BlobLocator, open_layer
from worker.flatten.times import pax_time
from worker.progress import Phase, ProgressCallback, ProgressEvent, no_progress
from worker.staging import sweep_stale, temp_prefix

BLOCKSIZE = 512
RECORDSIZE = 20 * BLOCKSIZE
_FLUSH_AT = 1 << 20

_TYPES = {
    EntryKind.FILE: tarfile.REGTYPE,
    EntryKind.DIR: tarfile.DIRTYPE,
    EntryKind.SYMLINK: tarfile.SYMTYPE,
    EntryKind.HARDLINK: tarfile.LNKTYPE,
    EntryKind.CHAR: tarfile.CHRTYPE,
    EntryKind.BLOCK: tarfile.BLKTYPE,
    EntryKind.FIFO: tarfile.FIFOTYPE,
}


@dataclass(slots=True)
class TarReport:
    entries: int = 0
    bytes_written: int = 0
    data_bytes: int = 0
    passthrough: int = 0
    dir_repeats: int = 0                 # directories written a second time, at the end
    layers_read: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class _Out:
    """Large buffered writes to a binary file object we do not own (never closed here)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = bytearray()
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n >= _FLUSH_AT:
            self.flush()
            self._write_all(data)
        else:
            self._buf += data
            if len(self._buf) >= _FLUSH_AT:
                self.flush()
        self.written += n

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = self._f.write(view)
            if n is None:  # non-blocking raw stream: not supported, but don't spin silently
                raise OSError("output stream would block")
            view = view[n:]

    def flush(self) -> None:
        if self._buf:
            self._write_all(self._buf)
            self._buf = bytearray()


def _mtime(e: IndexEntry) -> int | float:
    m = float(e.mtime)
    if not math.isfinite(m):    # a hostile header's inf/nan: no meaningful time
        return 0
    return int(m) if m.is_integer() else m


def _tarinfo(path: str, e: IndexEntry, kind: EntryKind, *, linkname: str = "",
             size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.type = _TYPES[kind]
    ti.mode = e.mode & 0o7777
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = _mtime(e)
    if isinstance(ti.mtime, float):   # the nanoseconds every other writer gives this mtime
        ti.pax_headers = {"mtime": pax_time(ti.mtime)}
    ti.size = size
    ti.linkname = linkname
    if kind in (EntryKind.CHAR, EntryKind.BLOCK):
        ti.devmajor, ti.devminor = e.devmajor, e.devminor
    return ti


def _pax_record(key: str, value: bytes) -> bytes:
    kv = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    n = len(kv) + len(str(len(kv)))
    n = len(kv) + len(str(n))
    return str(n).encode() + kv


def _encode(ti: tarfile.TarInfo, xattrs: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """PAX header blocks for ``ti``, plus ``SCHILY.xattr.*`` records carrying raw bytes.

    Names are bytes to a filesystem: a non-ASCII name goes into the ustar fields as it is when
    it fits, else into a PAX header that says ``hdrcharset=BINARY``: libarchive (``mke2fs -d -``) then takes them as they are instead of
    converting UTF-8 to the current locale, which fails under ``LC_ALL=C``. (GNU tar 1.34 warns
    that it ignores the keyword and uses the bytes, which is the same thing.) tarfile would
    also flag the header binary for a non-UTF-8 xattr value, so xattrs are added here.
    """
    binary = not (ti.name.isascii() and ti.linkname.isascii())
    if binary and not xattrs and not ti.pax_headers and isinstance(ti.mtime, int):
        # Short enough for the ustar name/prefix/linkname fields: store the bytes there, no
        # extended header at all (nothing for GNU tar to warn about).
        try:
            return ti.create_ustar_header(ti.get_info(), "utf-8", "surrogateescape")
        except ValueError:
            pass                    # too long, or a number out of ustar range: PAX below
    body = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if not xattrs and not binary:
        return body
    records = b""
    if body[156:157] == tarfile.XHDTYPE:
        size = int(body[124:136].rstrip(b"\0 ") or b"0", 8)
        records = body[BLOCKSIZE:BLOCKSIZE + size]
        body = body[BLOCKSIZE + size + (-size % BLOCKSIZE):]
    if binary and b" hdrcharset=BINARY\n" not in records:
        records = _pax_record("hdrcharset", b"BINARY") + records
    records += b"".join(_pax_record("SCHILY.xattr." + k, v) for k, v in xattrs)
    xh = tarfile.TarInfo("././@PaxHeader")
    xh.type = tarfile.XHDTYPE
    xh.size = len(records)
    return (xh.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % BLOCKSIZE)
            + body)


def sparse_map(e: IndexEntry) -> list[tuple[int, int]]:
    """The entry's data chunks in GNU sparse 1.0 form (ending at the apparent size)."""
    chunks = sorted((o, n) for o, n in (e.sparse or ()) if n > 0)
    if not chunks or chunks[-1][0] + chunks[-1][1] < e.size:
        chunks.append((e.size, 0))
    return chunks


def header_for(pe: PlannedEntry, owner: IndexEntry | None = None) -> bytes:
    """The PAX header block(s) for ``pe`` (data, if any, follows; sparse map included).

    For a hardlink, ``owner`` is the entry of the path it links to (the inode's owner): the
    link's header repeats that entry's mode, owner, mtime and xattrs, never the link entry's
    own, so every reader (GNU tar, libarchive, ``mke2fs -d -``, which apply a hardlink
    header's metadata to the shared inode) ends with the inode's metadata.
    """
    e = pe.entry
    if pe.link_to is not None:
        inode = owner or e
        return _encode(_tarinfo(pe.path, inode, EntryKind.HARDLINK, linkname=pe.link_to),
                       inode.xattrs)
    kind = e.kind
    if kind == EntryKind.SYMLINK:
        return _encode(_tarinfo(pe.path, e, kind, linkname=e.linkname), e.xattrs)
    if kind == EntryKind.FILE and e.sparse is not None:
        chunks = sparse_map(e)
        if sum(n for _, n in chunks) != e.data_size:
            raise CorruptLayer("sparse map does not add up to the stored size", path=pe.path)
        text = f"{len(chunks)}\n" + "".join(f"{o}\n{n}\n" for o, n in chunks)
        mapblock = text.encode()
        mapblock += b"\0" * (-len(mapblock) % BLOCKSIZE)
        head, _, tail = pe.path.rpartition("/")
        fake = (head + "/" if head else "") + "GNUSparseFile.0/" + tail
        ti = _tarinfo(fake, e, kind, size=len(mapblock) + e.data_size)
        ti.pax_headers = dict(ti.pax_headers, **{
            "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": pe.path,
            "GNU.sparse.realsize": str(e.size)})
        return _encode(ti, e.xattrs) + mapblock
    if kind == EntryKind.FILE:
        return _encode(_tarinfo(pe.path, e, kind, size=e.data_size), e.xattrs)
    return _encode(_tarinfo(pe.path, e, kind), e.xattrs)


def dir_header(pe: PlannedEntry, *, writable: bool = False) -> bytes:
    """A directory's header; ``writable`` adds u+rwx (the first of its two entries)."""
    e = pe.entry
    ti = _tarinfo("./" if pe.path == "." else pe.path, e, EntryKind.DIR)
    if writable:
        ti.mode |= 0o700
    return _encode(ti, e.xattrs)


def _octal(field: bytes) -> int | None:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if not field or field[0] & 0x80:      # empty or base-256: let the re-encoder handle it
        return None
    try:
        return int(field, 8)
    except ValueError:
        return None


def _raw_ok(raw: bytes, pe: PlannedEntry) -> bool:
    """True if ``raw`` (the entry's original, single-block header) can be copied unchanged.

    It must be a checksummed ustar/GNU header for a plain regular file whose name is exactly
    the final path (``./`` allowed), with no user/group names and the entry's metadata; the
    fields are read directly (tarfile's parser costs ~100 us a header).
    """
    e = pe.entry
    if len(raw) != BLOCKSIZE or e.sparse is not None or e.xattrs or raw[156:157] not in (
            b"0", b"\0"):
        return False
    magic = raw[257:265]
    name = raw[0:100].split(b"\0", 1)[0]
    if magic == b"ustar\x0000":
        prefix = raw[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    elif magic != b"ustar  \0":
        return False
    if raw[265:297].strip(b"\0") or raw[297:329].strip(b"\0"):
        return False                      # user/group names: we write numeric ids only
    chksum = _octal(raw[148:156])
    if chksum is None or chksum != sum(raw[:148]) + 256 + sum(raw[156:]):
        return False
    want = pe.path.encode("utf-8", "surrogateescape")
    if name != want and name != b"./" + want:
        return False
    return (_octal(raw[124:136]) == e.data_size == e.size
            and _octal(raw[100:108]) == e.mode and _octal(raw[108:116]) == e.uid
            and _octal(raw[116:124]) == e.gid and _octal(raw[136:148]) == e.mtime)


class _Progress:
    def __init__(self, plan: FlatPlan, cb: ProgressCallback) -> None:
        self.cb = cb
        self.total = plan.data_bytes
        self.layers_total = len(plan.layers)
        self.done = 0
        self.layers_done = 0
        self._last = 0

    def emit(self, message: str = "", force: bool = False) -> None:
        if force or self.done - self._last >= 64 << 20:
            self._last = self.done
            self.cb(ProgressEvent(phase=Phase.APPLY, bytes_done=self.done,
                                  bytes_total=self.total, layers_done=self.layers_done,
                                  layers_total=self.layers_total, message=message))


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Canceled("export canceled")


def write_tar(plan: FlatPlan, out: BinaryIO, locate: BlobLocator, *,
              progress: ProgressCallback = no_progress,
              cancel: threading.Event | None = None,
              on_layer_done: Callable[[int], None] | None = None,
              passthrough: bool = True) -> TarReport:
    """Write ``plan`` as a flattened PAX tar to ``out`` (not closed); return what was written.

    ``locate`` maps a layer to its cached blob. ``on_layer_done(i)`` is called once per layer,
    bottom to top, as soon as layer ``i`` will not be read again (``--low-disk`` deletes it).
    ``cancel`` is checked between layers and while reading. Raises CorruptLayer, Canceled,
    PackagingError (the output cannot be written: full disk, closed pipe).
    """
    try:
        return _write_tar(plan, out, locate, progress=progress, cancel=cancel,
                          on_layer_done=on_layer_done, passthrough=passthrough)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise PackagingError("the tar's reader went away before the end (broken pipe)"
                                 ) from exc
        raise PackagingError(f"cannot write the tar: {exc.strerror or exc}") from exc


def _write_tar(plan: FlatPlan, out: BinaryIO, locate: BlobLocator, *,
               progress: ProgressCallback, cancel: threading.Event | None,
               on_layer_done: Callable[[int], None] | None,
               passthrough: bool) -> TarReport:
    w = _Out(out)
    rep = TarReport(counts=dict(plan.counts))
    prog = _Progress(plan, progress)
    prog.emit("writing directories and links", force=True)

    dirs: list[PlannedEntry] = []
    for pe in plan.entries:
        if pe.link_to is None and not pe.has_data:
            if pe.entry.kind == EntryKind.DIR:
                dirs.append(pe)
                w.write(dir_header(pe, writable=True))
            else:
                w.write(header_for(pe))
            rep.entries += 1

    data_layers = plan.data_layers()
    for i, layer in enumerate(plan.layers):
        _check(cancel)
        todo = data_layers.get(i)
        if todo:
            stream = open_layer(locate, layer, cancel=cancel)
            try:
                for pe in todo:
                    e = pe.entry
                    raw = b""
                    if passthrough and e.sparse is None and e.header_offset < e.data_offset \
                            and e.data_offset - e.header_offset == BLOCKSIZE:
                        stream.skip_to(e.header_offset)
                        raw = stream.read_bytes(BLOCKSIZE)
                    if raw and _raw_ok(raw, pe):
                        w.write(raw)
                        rep.passthrough += 1
                    else:
                        w.write(header_for(pe))
                    stream.skip_to(e.data_offset)
                    for piece in stream.read(e.data_size):
                        w.write(piece)
                        prog.done += len(piece)
                    pad = -e.data_size % BLOCKSIZE
                    if pad:
                        w.write(b"\0" * pad)
                    rep.entries += 1
                    rep.data_bytes += e.data_size
                    prog.emit(f"layer {i + 1}/{len(plan.layers)}")
            finally:
                stream.close()
            rep.layers_read += 1
        if on_layer_done is not None:
            on_layer_done(i)
        prog.layers_done = i + 1
        prog.emit(f"layer {i + 1}/{len(plan.layers)} applied", force=True)

    _check(cancel)
    owners = {pe.path: pe.entry for pe in plan.entries if pe.link_to is None
              and pe.entry.kind != EntryKind.DIR}
    for pe in plan.entries:
        if pe.link_to is not None:
            w.write(header_for(pe, owners.get(pe.link_to)))
            rep.entries += 1
    # Directories again, deepest first, with their real mode: an extractor sets a directory's
    # mode and mtime from its last entry (GNU tar when the archive leaves it, libarchive and
    # mke2fs as it comes), so read-only directories receive their children and keep their
    # mtimes.
    for pe in reversed(dirs):
        w.write(dir_header(pe))
        rep.dir_repeats += 1

    w.write(b"\0" * (2 * BLOCKSIZE))
    w.write(b"\0" * (-w.written % RECORDSIZE))
    w.flush()
    flush = getattr(out, "flush", None)
    if flush is not None:
        flush()
    rep.bytes_written = w.written
    return rep


class _HashingWriter:
    """A binary sink that hashes what passes through to ``f``."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        self._f.write(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


def write_tar_file(plan: FlatPlan, output: str | Path, locate: BlobLocator, *,
                   progress: ProgressCallback = no_progress,
                   cancel: threading.Event | None = None,
                   on_layer_done: Callable[[int], None] | None = None
                   ) -> tuple[TarReport, str]:
    """Write the tar to ``output`` via a temporary name beside it, renamed on success.

    Returns the report and the sha256 (hex) of the file. Any failure removes the temp file.
    """
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    except OSError as exc:
        raise PackagingError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:   # buffered: write() takes everything
            hw = _HashingWriter(f)
            report = write_tar(plan, hw, locate, progress=progress,  # type: ignore[arg-type]
                               cancel=cancel, on_layer_done=on_layer_done)
            os.fchmod(f.fileno(), 0o644)  # mkstemp made it 0600
            os.fsync(f.fileno())
        from worker.export import check_output_path
        check_output_path(str(out), directory=False)   # never over a device or a symlink
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise PackagingError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
        raise
    return report, hw.sha.hexdigest()
