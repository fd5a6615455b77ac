"""Filesystem geometry and block allocation for the direct writer (pure; no I/O).

The layout is the one ``mke2fs`` makes with ``flex_bg``, taken to its limit: every group's
block bitmap, then every group's inode bitmap, then every inode table, packed right after the
primary group descriptors (one flex group spans the whole filesystem), so all data that
follows is one long run broken only by the ``sparse_super`` backups (superblock plus group
descriptors in groups 0, 1 and the powers of 3, 5 and 7). Allocation is a bump pointer over
that run, in the order the writer asks (journal, directories, then file data in layer stream
order), which is what lets the data go out in large sequential writes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from worker.errors import PackagingError

BLOCK = 4096
#: blocks per group unless the inodes need more groups (one bitmap block holds 32768 bits)
BLOCKS_PER_GROUP = 32768
#: inodes one group can hold: its inode bitmap is one block
MAX_GROUP_INODES = BLOCK * 8
INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK // INODE_SIZE
DESC_SIZE = 64
DESCS_PER_BLOCK = BLOCK // DESC_SIZE
#: the longest initialized extent
MAX_EXTENT = 32768
#: inodes 1-10 are reserved; lost+found is 11, the orphan file 12 (when enabled)
FIRST_INO = 11


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def backup_groups(groups: int) -> tuple[int, ...]:
    """Groups holding a superblock copy under ``sparse_super``: 0, 1, powers of 3, 5, 7."""
    found = {0, 1} if groups > 1 else {0}
    for base in (3, 5, 7):
        power = base
        while power < groups:
            found.add(power)
            power *= base
    return tuple(sorted(g for g in found if g < groups))


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where everything of fixed size lives; block numbers are absolute."""

    blocks: int
    groups: int
    blocks_per_group: int
    inodes_per_group: int
    inode_table_blocks: int          # per group
    gdt_blocks: int
    log_groups_per_flex: int
    backups: tuple[int, ...]         # groups with a superblock + descriptor copy
    block_bitmaps: tuple[int, ...]   # per group
    inode_bitmaps: tuple[int, ...]
    inode_tables: tuple[int, ...]

    @property
    def inodes(self) -> int:
        return self.groups * self.inodes_per_group

    def group_blocks(self, group: int) -> int:
        """Blocks in ``group`` (the last one may be short)."""
        return min(self.blocks_per_group, self.blocks - group * self.blocks_per_group)

    def reserved_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every superblock + descriptor copy, primary included."""
        return [(g * self.blocks_per_group, 1 + self.gdt_blocks) for g in self.backups]


def group_size(fs_blocks: int, inodes: int) -> int:
    """Blocks per group: 32768, or fewer (a multiple of 8) when ``inodes`` need more groups
    than that gives, the way mke2fs shrinks groups for images of many small files."""
    by_blocks = _ceil(fs_blocks, BLOCKS_PER_GROUP)
    groups = _ceil(inodes, MAX_GROUP_INODES - INODES_PER_BLOCK)
    if groups <= by_blocks:
        return BLOCKS_PER_GROUP
    return min(BLOCKS_PER_GROUP, _ceil(_ceil(fs_blocks, groups), 8) * 8)


def plan_geometry(fs_blocks: int, inodes: int) -> tuple[Geometry, Allocator]:
    """The geometry for a filesystem of about ``fs_blocks`` blocks holding ``inodes`` inodes,
    and an allocator positioned after its packed metadata.

    A last group too short to hold its own backup plus some data is dropped (as mke2fs does),
    so the block count may come out slightly smaller than asked.
    """
    bpg = group_size(fs_blocks, inodes)
    groups = _ceil(fs_blocks, bpg)
    gdt_blocks = _ceil(groups * DESC_SIZE, BLOCK)
    rem = fs_blocks - (groups - 1) * bpg
    if groups > 1 and rem < 1 + gdt_blocks + 64:
        groups -= 1
        fs_blocks = groups * bpg
        gdt_blocks = _ceil(groups * DESC_SIZE, BLOCK)
    per_group = _ceil(max(inodes, FIRST_INO + 2), groups)
    # whole inode-table blocks; an inode bitmap block holds at most MAX_GROUP_INODES bits
    per_group = min(MAX_GROUP_INODES, _ceil(per_group, INODES_PER_BLOCK) * INODES_PER_BLOCK)
    if per_group * groups < inodes:
        raise PackagingError(f"{inodes} inodes do not fit a filesystem of {fs_blocks} blocks")
    itable = per_group * INODE_SIZE // BLOCK
    log_flex = 4
    while (1 << log_flex) < groups:
        log_flex += 1
    backups = backup_groups(groups)
    alloc = Allocator(fs_blocks, [(g * bpg, 1 + gdt_blocks) for g in backups])
    bbm = [alloc.contiguous(1, "block bitmaps") for _ in range(groups)]
    ibm = [alloc.contiguous(1, "inode bitmaps") for _ in range(groups)]
    tables = [alloc.contiguous(itable, "inode tables") for _ in range(groups)]
    geo = Geometry(blocks=fs_blocks, groups=groups, blocks_per_group=bpg,
                   inodes_per_group=per_group,
                   inode_table_blocks=itable, gdt_blocks=gdt_blocks, log_groups_per_flex=log_flex,
                   backups=backups, block_bitmaps=tuple(bbm), inode_bitmaps=tuple(ibm),
                   inode_tables=tuple(tables))
    return geo, alloc


class Allocator:
    """Bump allocation of blocks in increasing order, around the reserved backup runs.

    Every run handed out (and every reserved run) is recorded, so the block bitmaps are built
    from :meth:`used_runs` at the end.
    """

    def __init__(self, blocks: int, reserved: list[tuple[int, int]]) -> None:
        self.blocks = blocks
        self._reserved = sorted(reserved)
        self._starts = [s for s, _ in self._reserved]
        self.cursor = 0
        self._runs: list[tuple[int, int]] = []
        self._skip()

    def _skip(self) -> None:
        """Move the cursor past a reserved run it points into."""
        i = bisect.bisect_right(self._starts, self.cursor) - 1
        if i >= 0:
            start, length = self._reserved[i]
            if self.cursor < start + length:
                self.cursor = start + length

    def _next_reserved(self) -> int:
        i = bisect.bisect_right(self._starts, self.cursor)
        return self._starts[i] if i < len(self._starts) else self.blocks

    def _full(self, n: int, what: str) -> PackagingError:
        return PackagingError(f"the ext4 image ({self.blocks} blocks of {BLOCK} bytes) is too "
                              f"small: no room for {n} more block(s) of {what}")

    def _take(self, start: int, n: int) -> None:
        if self._runs and self._runs[-1][0] + self._runs[-1][1] == start:
            last = self._runs[-1]
            self._runs[-1] = (last[0], last[1] + n)
        else:
            self._runs.append((start, n))
        self.cursor = start + n
        self._skip()

    def contiguous(self, n: int, what: str) -> int:
        """``n`` adjacent blocks (skipping ahead past a backup they would straddle)."""
        while True:
            limit = self._next_reserved()
            if self.cursor + n <= limit:
                break
            if limit >= self.blocks:
                raise self._full(n, what)
            self.cursor = limit
            self._skip()
        start = self.cursor
        self._take(start, n)
        return start

    def runs(self, n: int, what: str) -> list[tuple[int, int]]:
        """``n`` blocks as (start, length) runs, split only where a backup is in the way."""
        out: list[tuple[int, int]] = []
        while n > 0:
            if self.cursor >= self.blocks:
                raise self._full(n, what)
            limit = self._next_reserved()
            take = min(n, limit - self.cursor)
            start = self.cursor
            self._take(start, take)
            out.append((start, take))
            n -= take
        return out

    def used_runs(self) -> list[tuple[int, int]]:
        """Every allocated and reserved run, sorted."""
        return sorted(self._runs + self._reserved)


def extents_for(logical_runs: list[tuple[int, int]],
                physical: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(logical block, physical block, length) extents mapping ``logical_runs`` (sorted,
    disjoint, (first block, count)) onto ``physical`` runs of the same total length, in
    order, split at :data:`MAX_EXTENT` blocks and wherever either side is discontinuous."""
    out: list[tuple[int, int, int]] = []
    pi = 0
    p_start, p_left = physical[0] if physical else (0, 0)
    for l_start, l_count in logical_runs:
        while l_count > 0:
            if p_left == 0:
                pi += 1
                p_start, p_left = physical[pi]
            n = min(l_count, p_left, MAX_EXTENT)
            if out:
                ll, pp, nn = out[-1]
                if ll + nn == l_start and pp + nn == p_start and nn + n <= MAX_EXTENT:
                    out[-1] = (ll, pp, nn + n)
                    n_done = n
                else:
                    out.append((l_start, p_start, n))
                    n_done = n
            else:
                out.append((l_start, p_start, n))
                n_done = n
            l_start += n_done
            l_count -= n_done
            p_start += n_done
            p_left -= n_done
    return out
