"""The direct writer: a flattened plan and its cached layers -> an ext4 image file.

Everything but file data is decided before a byte of a layer is read: inode numbers (in plan
order, after the reserved ones), directory blocks, xattr blocks, the journal, the orphan file
and where every file's data goes (allocated in layer stream order, so each layer is read once
and its files land one after the other). Then the metadata is written, and the layers are
streamed through a large buffer into ``os.pwrite`` calls of several MiB. The image file is
created sparse (truncated to its size), so untouched blocks (free space, most of the inode
tables, the journal, holes of sparse files) are zeros that cost no I/O.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker.cache.index import EntryKind
from worker.errors import Canceled, LayerError, PackagingError
from worker.flatten.plan import FlatPlan, PlannedEntry
from worker.flatten.reader import BlobLocator, LayerStream, open_layer
from worker.flatten.tarout import sparse_map
from worker.flatten.times import EXT4_RANGE, split_time
from worker.package.ext4fs import checksum as ck
from worker.package.ext4fs import records as rec
from worker.package.ext4fs.layout import (
    BLOCK,
    INODE_SIZE,
    MAX_EXTENT,
    Geometry,
    extents_for,
    plan_geometry,
)
from worker.progress import Phase, ProgressCallback, ProgressEvent, no_progress

#: features the direct writer always produces
REQUIRED = frozenset({"sparse_super", "large_file", "filetype", "ext_attr", "extent", "huge_file",
                      "flex_bg", "metadata_csum", "64bit", "dir_nlink", "extra_isize"})
#: features it can leave out or add on request (resize_inode is accepted and left out: the
#: superblock then says so, and the guest can still grow the filesystem offline)
OPTIONAL = frozenset({"has_journal", "dir_index", "metadata_csum_seed", "orphan_file",
                      "resize_inode"})
#: what the data writer buffers before one pwrite
WRITE_BUFFER = 8 << 20

ROOT_INO, JOURNAL_INO, LOST_FOUND_INO, ORPHAN_INO = 2, 8, 11, 12

_FTYPE = {EntryKind.FILE: rec.FT_REG, EntryKind.DIR: rec.FT_DIR, EntryKind.SYMLINK: rec.FT_SYMLINK,
          EntryKind.CHAR: rec.FT_CHR, EntryKind.BLOCK: rec.FT_BLK, EntryKind.FIFO: rec.FT_FIFO}
_IFMT = {EntryKind.FILE: rec.S_IFREG, EntryKind.DIR: rec.S_IFDIR, EntryKind.SYMLINK: rec.S_IFLNK,
         EntryKind.CHAR: rec.S_IFCHR, EntryKind.BLOCK: rec.S_IFBLK, EntryKind.FIFO: rec.S_IFIFO}


def unsupported_features(features: Iterable[str]) -> list[str]:
    """What in ``features`` the direct writer cannot produce: unknown features by name, and
    required ones that are missing as ``^name``. Empty: it can write exactly this set."""
    wanted = set(features)
    bad = sorted(wanted - REQUIRED - OPTIONAL)
    bad += sorted(f"^{name}" for name in REQUIRED - wanted)
    if "orphan_file" in wanted and "has_journal" not in wanted:
        bad.append("orphan_file without has_journal")
    return bad


def written_features(features: Iterable[str]) -> frozenset[str]:
    """The features the superblock will carry for a request of ``features``."""
    return frozenset(features) - {"resize_inode"}


@dataclass(frozen=True, slots=True)
class DirectSpec:
    """What the image must look like besides its content."""

    blocks: int
    inodes: int
    features: frozenset[str]
    label: bytes
    uuid: bytes
    hash_seed: bytes
    fixed_time: int


@dataclass(slots=True)
class _Inode:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    mtime_ns: int = 0
    atime: int = 0
    ctime: int = 0
    links: int = 1
    flags: int = rec.EXTENTS_FL
    # empty tuples, not lists, by default: a 100k-entry image has 100k of these
    extents: Sequence[tuple[int, int, int]] = ()
    tree_blocks: Sequence[int] = ()
    i_block: bytes = b""
    xattrs: Sequence[rec.Xattr] = ()
    inline: Sequence[rec.Xattr] = ()
    xattr_block: int = 0
    path: str = ""      # the plan path that made it (for error messages)


@dataclass(slots=True)
class _Dir:
    inode: _Inode
    parent: int
    entries: list[tuple[int, bytes, int]] = field(default_factory=list)
    subdirs: int = 0
    min_blocks: int = 1
    blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Data:
    """Where one file's stored bytes go."""

    entry: PlannedEntry
    inode: _Inode
    segments: list[tuple[int, int]] | None   # (file offset, length) in stream order; None:
                                             # one run from offset 0 (not sparse)


class _Layout:
    """The pure part: every inode, block and record, before any I/O."""

    def __init__(self, plan: FlatPlan, spec: DirectSpec) -> None:
        self.plan = plan
        self.spec = spec
        self.csum_seed = ck.fs_seed(spec.uuid)
        self.geo, self.alloc = plan_geometry(spec.blocks, spec.inodes)
        self.inodes: dict[int, _Inode] = {}
        self.dirs: dict[str, _Dir] = {}
        self.meta: list[tuple[int, bytes | bytearray]] = []    # (block, bytes) to write
        self.data: dict[int, list[_Data]] = {}
        self.next_ino = ORPHAN_INO + 1 if "orphan_file" in spec.features else ORPHAN_INO
        self._file_inodes: dict[int, list[tuple[PlannedEntry, _Inode]]] = {}
        self._build()

    # -- inodes ----------------------------------------------------------------------------
    def _new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        if ino > self.geo.inodes:
            raise PackagingError(f"the ext4 image has {self.geo.inodes} inodes; this image "
                                 "needs more")
        return ino

    def _fixed(self, ino: int, mode: int) -> _Inode:
        t = self.spec.fixed_time
        return _Inode(ino=ino, mode=mode, mtime=t, atime=t, ctime=t)

    def _internal_file(self, ino: int, blocks: int, what: str) -> _Inode:
        """A reserved inode (journal, orphan file) owning ``blocks`` blocks from the allocator."""
        node = self._fixed(ino, rec.S_IFREG | 0o600)
        node.size = blocks * BLOCK
        node.extents = extents_for([(0, blocks)], self.alloc.runs(blocks, what))
        self.inodes[ino] = node
        return node

    def _from_entry(self, ino: int, pe: PlannedEntry) -> _Inode:
        e = pe.entry
        seconds, ns = split_time(e.mtime, EXT4_RANGE)
        node = _Inode(ino=ino, mode=_IFMT[e.kind] | (e.mode & 0o7777), uid=e.uid, gid=e.gid,
                      mtime=seconds, mtime_ns=ns, atime=seconds, ctime=seconds, path=pe.path)
        if e.xattrs:
            try:
                node.xattrs = [rec.split_xattr(name, value) for name, value in e.xattrs]
            except ValueError as exc:
                raise PackagingError(f"{pe.path!r}: {exc}") from None
        return node

    def _build(self) -> None:
        plan, spec = self.plan, self.spec
        csum = "metadata_csum" in spec.features
        # only hardlink targets need finding by path (a dict of every path costs memory)
        targets = {pe.link_to for pe in plan.entries if pe.link_to is not None}
        ino_of: dict[str, int] = {}
        kinds: dict[int, EntryKind] = {}
        links: list[tuple[_Dir, int, PlannedEntry]] = []
        has_lpf = any(pe.path == "lost+found" for pe in plan.entries)
        symlinks: list[tuple[_Inode, bytes]] = []
        for pe in plan.entries:
            if pe.path == ".":
                node = self._from_entry(ROOT_INO, pe)
                self.inodes[ROOT_INO] = node
                self.dirs["."] = _Dir(node, ROOT_INO)
                ino_of["."] = ROOT_INO
                if not has_lpf:
                    self._lost_found(self.dirs["."])
                continue
            parent_path, _, name = pe.path.rpartition("/")
            parent = self.dirs.get(parent_path or ".")
            if parent is None:
                raise PackagingError(f"{pe.path!r}: its parent is not a directory in the plan")
            if pe.link_to is not None:
                # the inode's owner may come later in tree order: fill the dirent in after
                links.append((parent, len(parent.entries), pe))
                parent.entries.append((0, os.fsencode(name), 0))
                continue
            e = pe.entry
            if e.kind not in _IFMT:
                raise PackagingError(f"{pe.path!r}: cannot store a {e.kind} in ext4")
            ino = LOST_FOUND_INO if pe.path == "lost+found" else self._new_ino()
            node = self._from_entry(ino, pe)
            self.inodes[ino] = node
            if pe.path in targets:
                ino_of[pe.path] = ino
                kinds[ino] = e.kind
            parent.entries.append((ino, os.fsencode(name), _FTYPE[e.kind]))
            if e.kind == EntryKind.DIR:
                d = _Dir(node, parent.inode.ino)
                if ino == LOST_FOUND_INO:
                    d.min_blocks = 4
                self.dirs[pe.path] = d
                parent.subdirs += 1
            elif e.kind == EntryKind.FILE:
                node.size = e.size
                if pe.has_data:
                    self._file_inodes.setdefault(pe.layer, []).append((pe, node))
            elif e.kind == EntryKind.SYMLINK:
                target = os.fsencode(e.linkname)
                node.size = len(target)
                if len(target) < 60:
                    node.flags = 0
                    node.i_block = target
                else:
                    symlinks.append((node, target))
            else:
                node.flags = 0
                if e.kind in (EntryKind.CHAR, EntryKind.BLOCK):
                    node.i_block = rec.device_block(e.devmajor, e.devminor)
        for parent, index, pe in links:
            ino = ino_of.get(pe.link_to or "", 0)
            if not ino:
                raise PackagingError(f"hardlink {pe.path!r} to {pe.link_to!r}, which is not "
                                     "in the plan")
            self.inodes[ino].links += 1
            parent.entries[index] = (ino, parent.entries[index][1], _FTYPE[kinds[ino]])
        for node in self.inodes.values():
            if node.links > rec.LINK_MAX and node.mode & 0o170000 != rec.S_IFDIR:
                raise PackagingError(f"{node.path!r} has {node.links} hardlinks: ext4 allows "
                                     f"at most {rec.LINK_MAX} names for one file")
        self._allocate(csum, symlinks)

    def _lost_found(self, root: _Dir) -> None:
        node = self._fixed(LOST_FOUND_INO, rec.S_IFDIR | 0o700)
        self.inodes[LOST_FOUND_INO] = node
        d = _Dir(node, ROOT_INO, min_blocks=4)
        self.dirs["lost+found"] = d
        root.entries.append((LOST_FOUND_INO, b"lost+found", rec.FT_DIR))
        root.subdirs += 1

    # -- allocation ------------------------------------------------------------------------------
    def _allocate(self, csum: bool, symlinks: list[tuple[_Inode, bytes]]) -> None:
        alloc = self.alloc
        spec = self.spec
        blocks = self.geo.blocks
        journal = orphan = None
        if "has_journal" in spec.features:
            n = rec.journal_blocks(blocks)
            journal = self._internal_file(JOURNAL_INO, n, "the journal")
            self.meta.append((journal.extents[0][1],
                              rec.journal_superblock(n, spec.uuid)))
        if "orphan_file" in spec.features:
            n = rec.orphan_file_blocks(blocks)
            orphan = self._internal_file(ORPHAN_INO, n, "the orphan file")
            seed = ck.inode_seed(self.csum_seed, ORPHAN_INO)
            for _, phys, length in orphan.extents:
                for b in range(phys, phys + length):
                    block = rec.orphan_block()
                    struct.pack_into("<I", block, BLOCK - 4,
                                     ck.orphan_block_csum(seed, b, memoryview(block)[:BLOCK - 8]))
                    self.meta.append((b, block))
        # Directories, in plan order (parents before children: a tree walk reads forward).
        for d in self.dirs.values():
            node = d.inode
            entries = [(node.ino, b".", rec.FT_DIR), (d.parent, b"..", rec.FT_DIR), *d.entries]
            content = rec.pack_dir_blocks(entries, csum_tail=csum)
            while len(content) < d.min_blocks:
                content.append(rec.empty_dir_block(csum_tail=csum))
            n = len(content)
            node.extents = extents_for([(0, n)], alloc.runs(n, "directories"))
            node.size = n * BLOCK
            links = 2 + d.subdirs
            node.links = 1 if links > rec.LINK_MAX else links
            seed = ck.inode_seed(self.csum_seed, node.ino)
            i = 0
            for _, phys, length in node.extents:
                for b in range(phys, phys + length):
                    block = content[i]
                    i += 1
                    if csum:
                        struct.pack_into("<I", block, BLOCK - 4,
                                         ck.raw(seed, memoryview(block)[:BLOCK - rec.DIR_TAIL]))
                    self.meta.append((b, block))
        for node, target in symlinks:
            (phys, _), = alloc.runs(1, "symlink targets")
            node.extents = [(0, phys, 1)]
            self.meta.append((phys, target.ljust(BLOCK, b"\0")))
        self._xattrs()
        # File data, layer by layer in stream order.
        for layer in sorted(self._file_inodes):
            todo = self._file_inodes.pop(layer)
            todo.sort(key=lambda item: item[0].entry.data_offset)
            jobs: list[_Data] = []
            for pe, node in todo:
                e = pe.entry
                if e.sparse is None:
                    count = -(-e.data_size // BLOCK)
                    runs = alloc.runs(count, "file data")
                    if len(runs) == 1 and count <= MAX_EXTENT:     # the common case
                        node.extents = [(0, runs[0][0], count)]
                    else:
                        node.extents = extents_for([(0, count)], runs)
                    jobs.append(_Data(pe, node, None))
                    continue
                else:
                    segments = [(o, n) for o, n in sparse_map(e) if n > 0]
                    logical = _logical_runs(segments)
                total = sum(n for _, n in logical)
                node.extents = extents_for(logical, alloc.runs(total, "file data"))
                jobs.append(_Data(pe, node, segments))
            self.data[layer] = jobs
        # Extent tree blocks last: only now is every inode's extent count known.
        for node in self.inodes.values():
            if len(node.extents) > rec.EXTENTS_IN_INODE:
                self._extent_tree(node)
        # (an inode with its extents in i_block gets that packed with the inode itself)

    def _xattrs(self) -> None:
        """Inline where everything fits the inode, else the rest in one (shared) block."""
        shared: dict[tuple[rec.Xattr, ...], tuple[int, list[_Inode]]] = {}
        for node in self.inodes.values():
            if not node.xattrs:
                continue
            ordered = sorted(node.xattrs, key=rec.Xattr.sort_key)
            if rec.fits_inline(ordered):
                node.inline = ordered
                continue
            inline: list[rec.Xattr] = []
            rest: list[rec.Xattr] = []
            for x in ordered:
                if not rest and rec.fits_inline([*inline, x]):
                    inline.append(x)
                else:
                    rest.append(x)
            if not rec.fits_block(rest):
                raise PackagingError(f"{node.path or node.ino!r}: its xattrs ("
                                     f"{sum(len(x.value) for x in node.xattrs)} bytes of values) "
                                     "do not fit one 4 KiB block (ea_inode is not supported)")
            node.inline = inline
            key = tuple(rest)
            if key in shared:
                shared[key][1].append(node)
            else:
                (phys, _), = self.alloc.runs(1, "xattr blocks")
                shared[key] = (phys, [node])
        for key, (phys, users) in shared.items():
            block = rec.xattr_block(key, len(users))
            struct.pack_into("<I", block, 0x10, ck.xattr_block_csum(self.csum_seed, phys, block))
            self.meta.append((phys, block))
            for node in users:
                node.xattr_block = phys

    def _extent_tree(self, node: _Inode) -> None:
        """Leaves of 340 extents, index blocks above them until four entries remain for
        the inode itself."""
        seed = ck.inode_seed(self.csum_seed, node.ino)
        level = list(node.extents)
        tree: list[int] = []
        depth = 0
        while len(level) > rec.EXTENTS_IN_INODE:
            upper: list[tuple[int, int, int]] = []
            for i in range(0, len(level), rec.EXTENTS_PER_BLOCK):
                chunk = level[i:i + rec.EXTENTS_PER_BLOCK]
                (phys, _), = self.alloc.runs(1, "extent tree blocks")
                block = rec.extent_node(chunk, depth, rec.EXTENTS_PER_BLOCK)
                block += bytes(BLOCK - len(block))
                tail = 12 + 12 * rec.EXTENTS_PER_BLOCK
                struct.pack_into("<I", block, tail, ck.raw(seed, memoryview(block)[:tail]))
                self.meta.append((phys, block))
                tree.append(phys)
                upper.append((chunk[0][0], phys, 0))
            level = upper
            depth += 1
        node.tree_blocks = tree
        node.i_block = bytes(rec.extent_node(level, depth, rec.EXTENTS_IN_INODE))


def _logical_runs(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first block, count) runs covering the data segments of a sparse file, merged."""
    runs: list[tuple[int, int]] = []
    for off, n in segments:
        first, last = off // BLOCK, (off + n - 1) // BLOCK
        if runs and first <= runs[-1][0] + runs[-1][1]:
            start, count = runs[-1]
            runs[-1] = (start, max(count, last - start + 1))
        else:
            runs.append((first, last - first + 1))
    return runs


# -- tables ------------------------------------------------------------------------------------

def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set ``count`` bits from bit ``first`` (ext4 bitmaps are little-endian bit order)."""
    end = first + count
    while first < end and first & 7:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    full = (end - first) >> 3
    if full > 0:
        bitmap[first >> 3:(first >> 3) + full] = b"\xff" * full
        first += full << 3
    while first < end:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1


def _block_bitmaps(geo: Geometry, used: list[tuple[int, int]]) -> list[bytearray]:
    bpg = geo.blocks_per_group
    maps = [bytearray(BLOCK) for _ in range(geo.groups)]
    for start, n in used:
        while n > 0:
            g, off = divmod(start, bpg)
            take = min(n, bpg - off)
            _set_bits(maps[g], off, take)
            start += take
            n -= take
    # bits past a group's last block (a short last group, or groups under 32768 blocks) read
    # as in use
    for g, bitmap in enumerate(maps):
        end = geo.group_blocks(g)
        if end < BLOCK * 8:
            _set_bits(bitmap, end, BLOCK * 8 - end)
    return maps


def _i_block(node: _Inode) -> bytes:
    """The inode's i_block: set by the layout (symlink target, device, extent tree root), or
    its extents when they fit (packed only now: 100k files need not keep 60 bytes each)."""
    if node.i_block or not node.flags & rec.EXTENTS_FL:
        return node.i_block
    return bytes(rec.extent_node(node.extents, 0, rec.EXTENTS_IN_INODE))


def _i_blocks(node: _Inode) -> int:
    """512-byte sectors the inode owns: data, extent tree, xattr block."""
    blocks = sum(n for _, _, n in node.extents) + len(node.tree_blocks)
    return (blocks + (1 if node.xattr_block else 0)) * (BLOCK // 512)


def _tables(layout: _Layout) -> list[tuple[int, bytes | bytearray]]:
    """Inode tables (used part), bitmaps, group descriptors and superblocks, with checksums."""
    geo, spec, seed = layout.geo, layout.spec, layout.csum_seed
    ipg = geo.inodes_per_group
    last_ino = layout.next_ino - 1
    used = [max(0, min(ipg, last_ino - g * ipg)) for g in range(geo.groups)]
    tables = [bytearray(n * INODE_SIZE) for n in used]
    dirs = [0] * geo.groups
    crtime = spec.fixed_time
    for node in layout.inodes.values():
        g, idx = divmod(node.ino - 1, ipg)
        buf = tables[g]
        off = idx * INODE_SIZE
        rec.pack_inode(buf, off, mode=node.mode, uid=node.uid, gid=node.gid, size=node.size,
                       links=node.links, blocks=_i_blocks(node), flags=node.flags,
                       i_block=_i_block(node), file_acl=node.xattr_block, mtime=node.mtime,
                       mtime_ns=node.mtime_ns, atime=node.atime, ctime=node.ctime,
                       crtime=crtime)
        if node.inline:
            rec.pack_inline_xattrs(buf, off, node.inline)
        rec.set_inode_csum(buf, off, ck.inode_csum(ck.inode_seed(seed, node.ino),
                                                   memoryview(buf)[off:off + INODE_SIZE]))
        if node.mode & 0o170000 == rec.S_IFDIR:
            dirs[g] += 1
    out: list[tuple[int, bytes | bytearray]] = [
        (geo.inode_tables[g], tables[g]) for g in range(geo.groups) if used[g]]

    bmaps = _block_bitmaps(geo, layout.alloc.used_runs())
    descs = bytearray()
    free_blocks_total = free_inodes_total = 0
    for g in range(geo.groups):
        bmap = bmaps[g]
        free_blocks = BLOCK * 8 - int.from_bytes(bmap, "little").bit_count()
        imap = bytearray(BLOCK)
        _set_bits(imap, 0, used[g])
        _set_bits(imap, ipg, BLOCK * 8 - ipg)
        free_inodes = ipg - used[g]
        free_blocks_total += free_blocks
        free_inodes_total += free_inodes
        desc = rec.group_desc(rec.GroupDesc(
            block_bitmap=geo.block_bitmaps[g], inode_bitmap=geo.inode_bitmaps[g],
            inode_table=geo.inode_tables[g], free_blocks=free_blocks, free_inodes=free_inodes,
            used_dirs=dirs[g], itable_unused=ipg - used[g],
            block_bitmap_csum=ck.bitmap_csum(seed, memoryview(bmap)[:geo.blocks_per_group // 8]),
            inode_bitmap_csum=ck.bitmap_csum(seed, memoryview(imap)[:ipg // 8])))
        struct.pack_into("<H", desc, 0x1E, ck.group_desc_csum(seed, g, desc))
        descs += desc
        out.append((geo.block_bitmaps[g], bmap))
        out.append((geo.inode_bitmaps[g], imap))
    descs += bytes(geo.gdt_blocks * BLOCK - len(descs))

    jnl: tuple[int, ...] = ()
    journal = layout.inodes.get(JOURNAL_INO)
    if journal is not None:
        words = struct.unpack("<15I", _i_block(journal).ljust(60, b"\0"))
        jnl = (*words, journal.size >> 32, journal.size & 0xFFFFFFFF)
    fields = rec.SuperblockFields(
        inodes=geo.inodes, blocks=geo.blocks, free_blocks=free_blocks_total,
        free_inodes=free_inodes_total, inodes_per_group=ipg,
        log_groups_per_flex=geo.log_groups_per_flex, uuid=spec.uuid, hash_seed=spec.hash_seed,
        label=spec.label, features=spec.features, fixed_time=spec.fixed_time,
        blocks_per_group=geo.blocks_per_group,
        csum_seed=seed, journal_blocks=jnl,
        orphan_inode=ORPHAN_INO if "orphan_file" in spec.features else 0)
    for g in geo.backups:
        sb = rec.superblock(fields, group_nr=g)
        struct.pack_into("<I", sb, 0x3FC, ck.superblock_csum(sb))
        start = g * geo.blocks_per_group
        # the primary sits 1024 bytes into block 0; the copies at the start of their block
        out.append((start, bytes(1024) + sb + bytes(BLOCK - 2048) if g == 0
                    else sb + bytes(BLOCK - 1024)))
        out.append((start + 1, descs))
    return out


# -- the I/O shell -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DirectReport:
    blocks: int            # the filesystem's block count (a too-short last group is dropped)
    inodes: int
    data_bytes: int        # bytes read from the layers and written
    file_size: int         # bytes of the image file (the filesystem, aligned up)
    sha256: str            # of the image file as written


_Bytes = bytes | bytearray | memoryview


class _Output:
    """The image written front to back and hashed on the way, by a writer thread.

    Every block's place is known before the first layer is read (the allocator hands out
    blocks in the order they are written: metadata, then file data in stream order, then
    extent-tree blocks), so the whole file goes out in increasing offsets: the metadata
    records, runs of file data, and between them gaps that stay holes and are hashed as
    zeros. File data is not copied: the inflated chunks are immutable ``bytes``, so views of
    them go to the writer thread as they are, a run of adjacent files (each padded to its
    block's end with zeros) as one ``pwritev`` of up to several MiB. ``pwritev`` and
    ``sha256`` release the GIL, so the writer thread does both while the main thread inflates
    the next bytes; the sha256 of the image (its aligned size included) costs no second read.
    """

    def __init__(self, fd: int, meta: list[tuple[int, bytes | bytearray]], size: int) -> None:
        self.fd = fd
        # sorted last-first: pop() hands each record over and drops our reference to it
        meta.sort(key=lambda item: item[0], reverse=True)
        self.meta = meta
        self.size = size
        self.run: list[_Bytes] = []      # the data run being gathered
        self.run_start = 0
        self.run_end = 0
        self.sent = 0           # image offset up to which everything is queued
        self.hash = hashlib.sha256()
        self.error: BaseException | None = None
        # a few runs in flight: memory stays bounded, the two threads stay busy
        self.queue: queue.Queue[tuple[int, list[_Bytes], int] | None] = queue.Queue(maxsize=3)
        self.thread = threading.Thread(target=self._run, name="ext4-writer", daemon=True)
        self.thread.start()

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        zeros = bytes(1 << 20)
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue            # keep draining so the producer never blocks
            offset, views, gap = item
            try:
                if views:
                    _pwritev_all(self.fd, views, offset)
                    for view in views:
                        self.hash.update(view)
                while gap > 0:
                    n = min(gap, len(zeros))
                    self.hash.update(zeros if n == len(zeros) else zeros[:n])
                    gap -= n
            except BaseException as exc:   # noqa: BLE001 - handed to the main thread
                self.error = exc

    def _send(self, offset: int, views: list[_Bytes], length: int) -> None:
        if self.error is not None:
            raise self.error
        if offset > self.sent:
            self.queue.put((self.sent, [], offset - self.sent))
        self.queue.put((offset, views, 0))
        self.sent = offset + length

    def _meta_before(self, limit: int) -> None:
        """Queue the metadata records that start before image offset ``limit``."""
        meta = self.meta
        while meta and meta[-1][0] * BLOCK < limit:
            first, data = meta.pop()
            run: list[_Bytes] = [data]
            nbytes = len(data)
            # adjacent whole-block records go out as one write
            while (meta and nbytes % BLOCK == 0 and nbytes < WRITE_BUFFER
                   and meta[-1][0] == first + nbytes // BLOCK and meta[-1][0] * BLOCK < limit):
                data = meta.pop()[1]
                run.append(data)
                nbytes += len(data)
            self._send(first * BLOCK, run, nbytes)

    # -- the main thread ---------------------------------------------------------------------
    def write(self, pos: int, data: _Bytes) -> None:
        """File data at image offset ``pos`` (never below what was written before). ``data``
        must not change afterwards (a view of an immutable chunk)."""
        gap = pos - self.run_end
        if self.run and 0 <= gap < BLOCK:
            if gap:        # the zero tail of the previous file's last block
                self.run.append(_ZERO_BLOCK[:gap])
        else:
            self.close_run()
            self._meta_before(pos)
            self.run_start = pos
        self.run.append(data)
        self.run_end = pos + len(data)
        if self.run_end - self.run_start >= WRITE_BUFFER:
            self._send(self.run_start, self.run, self.run_end - self.run_start)
            self.run = []
            self.run_start = self.run_end

    def close_run(self) -> None:
        """Hand the gathered run over, padded to its last block's end (tails read as zeros)."""
        if self.run:
            pad = -self.run_end % BLOCK
            if pad:
                self.run.append(_ZERO_BLOCK[:pad])
                self.run_end += pad
            self._send(self.run_start, self.run, self.run_end - self.run_start)
            self.run = []
        self.run_start = self.run_end

    def finish(self) -> str:
        """Write what is left, wait for the writer; the sha256 of the whole file."""
        self.close_run()
        self._meta_before(self.size)
        if self.sent < self.size:
            self._send(self.size, [], 0)
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.hash.hexdigest()

    def abort(self) -> None:
        """Stop the writer thread after a failure (what it has not written is lost anyway)."""
        if self.thread.is_alive():
            self.error = self.error or Canceled("stopped")
            self.queue.put(None)
            self.thread.join()


_ZERO_BLOCK = memoryview(bytes(BLOCK))
#: iovecs per pwritev call (the kernel's IOV_MAX)
_IOV_MAX = 1024


def _pwritev_all(fd: int, views: list[_Bytes], offset: int) -> None:
    """Write ``views`` back to back from ``offset``, in as few system calls as possible."""
    for i in range(0, len(views), _IOV_MAX):
        group = views[i:i + _IOV_MAX]
        written = os.pwritev(fd, group, offset)
        for view in group:
            n = len(view)
            if written < n:    # a short write (rare): finish this group piece by piece
                _pwrite_all(fd, memoryview(view)[max(written, 0):], offset + max(written, 0))
            written -= n
            offset += n


def _pwrite_all(fd: int, data: _Bytes, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy_file(stream: LayerStream, sink: _Output, job: _Data) -> None:
    """Stream one file's stored bytes to its blocks."""
    extents = job.inode.extents
    stream.skip_to(job.entry.entry.data_offset)
    if job.segments is None and len(extents) == 1:
        # the common case (one extent, not sparse): no mapping per piece
        base = extents[0][1] * BLOCK
        for piece in stream.read(job.entry.entry.data_size):
            sink.write(base, piece)
            base += len(piece)
        return
    ei = 0
    segments = job.segments or ((0, job.entry.entry.data_size),)
    for off, n in segments:
        for piece in stream.read(n):
            while len(piece):
                blk = off // BLOCK
                while extents[ei][0] + extents[ei][2] <= blk:
                    ei += 1
                logical, phys, length = extents[ei]
                room = (logical + length) * BLOCK - off
                k = min(room, len(piece))
                sink.write((phys - logical) * BLOCK + off, piece[:k])
                off += k
                piece = piece[k:]


def write_image(plan: FlatPlan, image: Path, spec: DirectSpec, locate: BlobLocator, *,
                alignment: int = BLOCK,
                progress: ProgressCallback = no_progress,
                cancel: threading.Event | None = None,
                on_layer_done: Callable[[int], None] | None = None) -> DirectReport:
    """Write ``plan`` as an ext4 filesystem into the new file ``image`` (created sparse, its
    size the filesystem's rounded up to ``alignment``); the report carries its sha256.

    Reads each layer that holds data once, front to back. Raises PackagingError (the image
    too small, a tree ext4 cannot hold), CorruptLayer naming the layer, Canceled; the caller
    removes the file on failure.
    """
    layout = _Layout(plan, spec)
    total = plan.data_bytes
    done = last_report = 0
    current = "."
    size = -(-layout.geo.blocks * BLOCK // alignment) * alignment
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PackagingError(f"cannot create {image}: {exc.strerror or exc}") from exc
    out: _Output | None = None
    try:
        os.ftruncate(fd, size)
        meta = layout.meta
        layout.meta = []
        meta += _tables(layout)
        # from here on only the files with data need their inode records
        layout.inodes.clear()
        layout.dirs.clear()
        out = _Output(fd, meta, size)
        del meta
        layers_total = len(plan.layers)
        for i, layer in enumerate(plan.layers):
            if cancel is not None and cancel.is_set():
                raise Canceled("export canceled")
            jobs = layout.data.pop(i, None)
            if jobs:
                stream = open_layer(locate, layer, cancel=cancel)
                try:
                    for job in jobs:
                        current = job.entry.path
                        _copy_file(stream, out, job)
                        done += job.entry.entry.data_size
                        if done - last_report >= 64 << 20:
                            last_report = done
                            progress(ProgressEvent(
                                phase=Phase.APPLY, bytes_done=done, bytes_total=total,
                                layers_done=i, layers_total=layers_total,
                                message=f"layer {i + 1}/{layers_total}"))
                finally:
                    stream.close()
            if on_layer_done is not None:
                on_layer_done(i)
            progress(ProgressEvent(phase=Phase.APPLY, bytes_done=done, bytes_total=total,
                                   layers_done=i + 1, layers_total=layers_total,
                                   message=f"layer {i + 1}/{layers_total} applied"))
        current = "."
        digest = out.finish()
        out = None
    except LayerError as exc:
        if exc.path is None and current != ".":
            # the reader knows the layer, not which file it was reading for
            exc.path = current
            exc.args = (f"{exc.args[0]} (reading the data of {current!r})",)
        raise
    except OSError as exc:
        raise PackagingError(f"cannot write {image} (at {current!r}): "
                             f"{exc.strerror or exc}") from exc
    finally:
        if out is not None:
            out.abort()
        os.close(fd)
    return DirectReport(blocks=layout.geo.blocks, inodes=layout.geo.inodes, data_bytes=done,
                        file_size=size, sha256=digest)
