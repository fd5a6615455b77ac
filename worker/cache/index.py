"""The compact per-layer entry index, built while a layer streams in.

Later stages plan the flattening and size the ext4 image from these indexes alone, without
decompressing anything; data is read once, at apply time, by ``header_offset``/``data_offset``
in the uncompressed stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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


def dump_index(index: LayerIndex) -> bytes:
    """Serialise ``index`` for storage beside its blob."""
    raise NotImplementedError


def load_index(data: bytes) -> LayerIndex:
    """Inverse of :func:`dump_index`; raises CorruptLayer on malformed data."""
    raise NotImplementedError
