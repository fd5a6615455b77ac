"""Size an ext4 image from the flatten plan (pure; no I/O).

What the content needs is computed here, entry by entry: data blocks (4 KiB rounding,
sparse-aware, hardlinked inodes once), directory blocks, blocks for long symlink targets,
extent-tree blocks for fragmented or sparse files, external xattr blocks, and inodes. What the
filesystem itself costs (superblock backups, group descriptors, reserved GDT blocks, bitmaps,
inode tables, journal) depends on mke2fs's layout, so it is measured rather than guessed:
``ext4.py`` formats an empty filesystem of the candidate size with the same options and reads
its free block and inode counts (:func:`fits`).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

from worker.cache.index import EntryKind
from worker.flatten.plan import FlatPlan
from worker.package.ext4fs.layout import BLOCK, INODE_SIZE
from worker.package.ext4fs.records import DIR_TAIL, EXTENTS_IN_INODE, EXTENTS_PER_BLOCK, EXTRA_ISIZE

#: ext4 reserves inodes 1-10; lost+found takes 11 and orphan_file (when enabled) 12
RESERVED_INODES = 12
#: a symlink target shorter than this lives in the inode ("fast symlink")
FAST_SYMLINK_MAX = 59
#: bytes a directory block holds for entries (a block minus the metadata_csum tail)
DIR_BLOCK_PAYLOAD = BLOCK - DIR_TAIL
#: in-inode xattr space of a 256-byte inode after its extra fields, minus the xattr header
INLINE_XATTR_SPACE = INODE_SIZE - 128 - EXTRA_ISIZE - 4
#: an extent maps at most 32768 blocks; plan for half that (block-group boundaries, backups)
EXTENT_BLOCKS = 16384
#: extents held in the inode itself (one extent block holds EXTENTS_PER_BLOCK)
INODE_EXTENTS = EXTENTS_IN_INODE


@dataclass(frozen=True, slots=True)
class ContentNeeds:
    """Blocks and inodes the plan's content needs inside the filesystem."""

    data_blocks: int
    dir_blocks: int
    symlink_blocks: int
    extent_blocks: int
    xattr_blocks: int
    inodes: int                  # inodes used, including the reserved ones

    @property
    def blocks(self) -> int:
        return (self.data_blocks + self.dir_blocks + self.symlink_blocks + self.extent_blocks
                + self.xattr_blocks)

    @property
    def bytes(self) -> int:
        return self.blocks * BLOCK


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return _ceil(value, alignment) * alignment


def _data_blocks(size: int, sparse: tuple[tuple[int, int], ...] | None) -> tuple[int, int]:
    """(data blocks, extents) a regular file needs; sparse files only for their data chunks."""
    if sparse is None:
        blocks = _ceil(size, BLOCK)
        return blocks, _ceil(blocks, EXTENT_BLOCKS)
    covered: set[int] = set()     # blocks of small chunks (chunks may share a block)
    big = 0                       # blocks of large chunks, counted without enumerating them
    extents = 0
    for offset, length in sparse:
        if length <= 0:
            continue
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if last - first >= 4096:
            big += last - first + 1
            extents += _ceil(last - first + 1, EXTENT_BLOCKS)
        else:
            covered.update(range(first, last + 1))
            extents += 1
    blocks = len(covered) + big
    return blocks, extents


def _extent_tree_blocks(extents: int) -> int:
    if extents <= INODE_EXTENTS:
        return 0
    leaves = _ceil(extents, EXTENTS_PER_BLOCK)
    return leaves + (_ceil(leaves, EXTENTS_PER_BLOCK) if leaves > INODE_EXTENTS else 0)


def _xattr_block(xattrs: tuple[tuple[str, bytes], ...]) -> int:
    if not xattrs:
        return 0
    used = 4   # terminating zero entry
    for name, value in xattrs:
        suffix = name.split(".", 1)[1] if "." in name else name
        used += 16 + _ceil(len(suffix.encode(errors="surrogateescape")), 4) * 4
        used += _ceil(len(value), 4) * 4
    return 0 if used <= INLINE_XATTR_SPACE else _ceil(used, BLOCK)


def content_needs(plan: FlatPlan) -> ContentNeeds:
    """Blocks and inodes the plan's content takes in a 4 KiB-block ext4 filesystem."""
    data = symlinks = extents = xattrs = 0
    inodes = RESERVED_INODES
    dir_bytes: dict[str, int] = defaultdict(int)
    dirs: set[str] = {"."}
    for planned in plan.entries:
        entry = planned.entry
        path = planned.path
        if path == ".":
            xattrs += _xattr_block(entry.xattrs)
            continue
        parent, _, name = path.rpartition("/")
        parent = parent or "."
        dir_bytes[parent] += 8 + _ceil(len(os.fsencode(name)), 4) * 4
        if planned.link_to is not None or entry.kind == EntryKind.HARDLINK:
            continue    # another name for an inode counted already
        inodes += 1
        xattrs += _xattr_block(entry.xattrs)
        if entry.kind == EntryKind.DIR:
            dirs.add(path)
        elif entry.kind == EntryKind.FILE:
            blocks, n_extents = _data_blocks(entry.size, entry.sparse)
            data += blocks
            extents += _extent_tree_blocks(n_extents)
        elif (entry.kind == EntryKind.SYMLINK
              and len(os.fsencode(entry.linkname)) > FAST_SYMLINK_MAX):
            symlinks += 1
    dir_blocks = 0
    for d in dirs:
        payload = 24 + dir_bytes.get(d, 0)          # "." and ".." plus the entries
        blocks = _ceil(payload, DIR_BLOCK_PAYLOAD)
        # libext2fs fills blocks first-fit, but leave slack (and an htree root) for big dirs
        if blocks > 1:
            blocks = _ceil(blocks * 5, 4) + 1
        dir_blocks += blocks
    # lost+found: mke2fs pre-allocates 16 KiB
    dir_blocks += 4
    return ContentNeeds(data_blocks=data, dir_blocks=dir_blocks, symlink_blocks=symlinks,
                        extent_blocks=extents, xattr_blocks=xattrs, inodes=inodes)


def headroom_bytes(needs: ContentNeeds, fraction: float, min_free: int) -> int:
    """Free space to leave: ``fraction`` of the content, at least ``min_free`` bytes."""
    return max(math.ceil(needs.bytes * fraction), min_free)


def inode_count(needs: ContentNeeds, free_bytes: int) -> int:
    """Inodes to ask mke2fs for (``-N``): what the content uses plus a margin.

    The margin is a quarter of the content's inodes (never fewer than 1024) plus one inode per
    16 KiB of free space (mke2fs's default ratio), so a tree of many tiny files never runs out
    and the guest can still create files in its free space.
    """
    margin = max(1024, needs.inodes // 4) + free_bytes // 16384
    return needs.inodes + margin


def initial_fs_size(needs: ContentNeeds, inodes: int, free: int, alignment: int) -> int:
    """A first guess at the filesystem size (bytes, aligned), refined by measuring mke2fs.

    Overhead: inode tables, ~1.5% for group metadata and backups, a journal of about 1/64 of
    the filesystem (at least 4 MiB, at most 1 GiB), plus 4 MiB of slack.
    """
    base = needs.bytes + free + inodes * INODE_SIZE
    journal = min(max(base // 64, 4 << 20), 1 << 30)
    guess = base + journal + base // 64 + (4 << 20)
    return align_up(guess, alignment)
