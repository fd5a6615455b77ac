"""Packing ext4 on-disk records (pure; little-endian unless said otherwise).

Field offsets follow the kernel's ext4 documentation (super, group_descr, inodes, ifork,
directory, attributes, journal). Only what the direct writer produces is packed; every
record leaves its checksum field zero for the caller to fill once the bytes are final.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from worker.package.ext4fs.layout import BLOCK, INODE_SIZE

# -- feature bits -------------------------------------------------------------------------------

COMPAT = {"has_journal": 0x4, "ext_attr": 0x8, "resize_inode": 0x10, "dir_index": 0x20,
          "orphan_file": 0x1000}
INCOMPAT = {"filetype": 0x2, "extent": 0x40, "64bit": 0x80, "flex_bg": 0x200,
            "metadata_csum_seed": 0x2000}
RO_COMPAT = {"sparse_super": 0x1, "large_file": 0x2, "huge_file": 0x8, "dir_nlink": 0x20,
             "extra_isize": 0x40, "metadata_csum": 0x400}

# -- inode constants ----------------------------------------------------------------------------

S_IFIFO, S_IFCHR, S_IFDIR, S_IFBLK, S_IFREG, S_IFLNK, S_IFSOCK = (
    0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000)
EXTENTS_FL = 0x80000
EXTRA_ISIZE = 32
#: dirent file types (the ``filetype`` feature)
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7
#: nlink of a directory with more subdirectories than this is 1 (``dir_nlink``)
LINK_MAX = 65000

EXT_MAGIC = 0xF30A
EXTENTS_IN_INODE = 4
EXTENTS_PER_BLOCK = (BLOCK - 12) // 12      # 340
DIR_TAIL = 12                                # the metadata_csum tail of a directory block
XATTR_MAGIC = 0xEA020000
ORPHAN_MAGIC = 0x0B10CA04
JBD2_MAGIC = 0xC03B3998


@dataclass(frozen=True, slots=True)
class SuperblockFields:
    """The variable part of a superblock; everything else is fixed by our profile."""

    inodes: int
    blocks: int
    free_blocks: int
    free_inodes: int
    inodes_per_group: int
    log_groups_per_flex: int
    uuid: bytes
    hash_seed: bytes
    label: bytes
    features: frozenset[str]
    fixed_time: int
    csum_seed: int
    journal_blocks: tuple[int, ...] = ()   # s_jnl_blocks: i_block words, size hi, size lo
    orphan_inode: int = 0
    blocks_per_group: int = 32768


def superblock(f: SuperblockFields, group_nr: int = 0) -> bytearray:
    """The 1024-byte superblock (``s_checksum`` zero) as the copy for group ``group_nr``."""
    sb = bytearray(1024)
    compat = sum(COMPAT[x] for x in f.features if x in COMPAT)
    incompat = sum(INCOMPAT[x] for x in f.features if x in INCOMPAT)
    ro = sum(RO_COMPAT[x] for x in f.features if x in RO_COMPAT)
    t = f.fixed_time
    struct.pack_into("<IIIIIIIIIIIIIHhHHHHIIIIHH", sb, 0,
                     f.inodes, f.blocks & 0xFFFFFFFF, 0, f.free_blocks & 0xFFFFFFFF,
                     f.free_inodes, 0, 2, 2, f.blocks_per_group, f.blocks_per_group,
                     f.inodes_per_group,
                     0, t,                      # s_mtime (never mounted), s_wtime
                     0, -1, 0xEF53, 1, 1, 0,    # mnt count, max (-1: no forced fsck), magic,
                     t, 0, 0, 1, 0, 0)          # state clean, errors continue; lastcheck...
    struct.pack_into("<IHHIII", sb, 0x54, 11, INODE_SIZE, group_nr, compat, incompat, ro)
    sb[0x68:0x78] = f.uuid
    sb[0x78:0x88] = f.label.ljust(16, b"\0")
    if "has_journal" in f.features:
        struct.pack_into("<I", sb, 0xE0, 8)
    sb[0xEC:0xFC] = f.hash_seed
    struct.pack_into("<BBH", sb, 0xFC, 1, 1 if f.journal_blocks else 0, 64)  # half_md4
    struct.pack_into("<II", sb, 0x100, 0x0C, 0)          # user_xattr,acl; first_meta_bg
    struct.pack_into("<I", sb, 0x108, t)                 # s_mkfs_time
    if f.journal_blocks:
        struct.pack_into("<17I", sb, 0x10C, *f.journal_blocks)
    struct.pack_into("<III", sb, 0x150, f.blocks >> 32, 0, f.free_blocks >> 32)
    struct.pack_into("<HHI", sb, 0x15C, EXTRA_ISIZE, EXTRA_ISIZE, 0x1)   # signed dir hash
    struct.pack_into("<BB", sb, 0x174, f.log_groups_per_flex, 1)          # crc32c
    if "metadata_csum_seed" in f.features:
        struct.pack_into("<I", sb, 0x270, f.csum_seed)
    if f.orphan_inode:
        struct.pack_into("<I", sb, 0x280, f.orphan_inode)
    return sb


_GD = struct.Struct("<IIIHHHHIHHHHIIIHHHHIHHI")


@dataclass(frozen=True, slots=True)
class GroupDesc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks: int
    free_inodes: int
    used_dirs: int
    itable_unused: int
    block_bitmap_csum: int
    inode_bitmap_csum: int
    flags: int = 0x4          # ITABLE_ZEROED: the image starts as a sparse file of zeros


def group_desc(d: GroupDesc) -> bytearray:
    """A 64-byte group descriptor (``bg_checksum`` zero)."""
    buf = bytearray(64)
    lo, hi = 0xFFFFFFFF, 32
    _GD.pack_into(buf, 0, d.block_bitmap & lo, d.inode_bitmap & lo, d.inode_table & lo,
                  d.free_blocks & 0xFFFF, d.free_inodes & 0xFFFF, d.used_dirs & 0xFFFF, d.flags,
                  0, d.block_bitmap_csum & 0xFFFF, d.inode_bitmap_csum & 0xFFFF,
                  d.itable_unused & 0xFFFF, 0,
                  d.block_bitmap >> hi, d.inode_bitmap >> hi, d.inode_table >> hi,
                  d.free_blocks >> 16, d.free_inodes >> 16, d.used_dirs >> 16,
                  d.itable_unused >> 16, 0, d.block_bitmap_csum >> 16,
                  d.inode_bitmap_csum >> 16, 0)
    return buf


# -- inodes -------------------------------------------------------------------------------------

#: i_mode .. i_block start (0x00-0x27), then i_generation .. end of the extra fields
_INODE_HEAD = struct.Struct("<HHIIIIIHHII4x")
_INODE_TAIL = struct.Struct("<IIIIHHHH4xHHIIIII")


def encode_time(seconds: int) -> tuple[int, int]:
    """(32-bit field, epoch bits for the extra field) of a time in ext4's 34-bit range."""
    low = seconds & 0xFFFFFFFF
    signed = low - (1 << 32) if low & 0x80000000 else low
    return low, ((seconds - signed) >> 32) & 3


def pack_inode(buf: bytearray, off: int, *, mode: int, uid: int, gid: int, size: int,
               links: int, blocks: int, flags: int, i_block: bytes, file_acl: int,
               mtime: int, mtime_ns: int, atime: int, ctime: int, crtime: int) -> None:
    """Pack one 256-byte inode at ``buf[off:]`` (which must be zero; checksum left zero).

    ``blocks`` counts 512-byte sectors; times are whole seconds except mtime's nanoseconds.
    """
    m_lo, m_ep = encode_time(mtime)
    # atime and ctime are mtime's seconds for every entry of an image: encode once
    a_lo, a_ep = (m_lo, m_ep) if atime == mtime else encode_time(atime)
    c_lo, c_ep = (m_lo, m_ep) if ctime == mtime else encode_time(ctime)
    cr_lo, cr_ep = encode_time(crtime)
    _INODE_HEAD.pack_into(buf, off, mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_lo, c_lo, m_lo, 0,
                          gid & 0xFFFF, links, blocks & 0xFFFFFFFF, flags)
    buf[off + 0x28:off + 0x28 + len(i_block)] = i_block
    _INODE_TAIL.pack_into(buf, off + 0x64, 0, file_acl & 0xFFFFFFFF, size >> 32,
                          0, (blocks >> 32) & 0xFFFF, file_acl >> 32, uid >> 16, gid >> 16,
                          EXTRA_ISIZE, 0, c_ep, (mtime_ns << 2) | m_ep, a_ep, cr_lo, cr_ep)


def set_inode_csum(buf: bytearray, off: int, csum: int) -> None:
    struct.pack_into("<H", buf, off + 0x7C, csum & 0xFFFF)
    struct.pack_into("<H", buf, off + 0x82, csum >> 16)


def device_block(major: int, minor: int) -> bytes:
    """i_block of a device node: the old 16-bit encoding where it fits, else the new one
    in the second word (the kernel reads either)."""
    if major < 256 and minor < 256:
        return struct.pack("<II", (major << 8) | minor, 0)
    return struct.pack("<III", 0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12), 0)


# -- extents ------------------------------------------------------------------------------------

_EH = struct.Struct("<HHHHI")
_EXT = struct.Struct("<IHHI")
_IDX = struct.Struct("<IIHH")


def extent_node(entries: Sequence[tuple[int, int, int]], depth: int, capacity: int) -> bytearray:
    """An extent node: header plus entries. Leaves (depth 0) take (logical, physical, length);
    index nodes take (logical, child block, 0). ``capacity`` is eh_max (4 in the inode)."""
    buf = bytearray(12 + 12 * capacity)
    _EH.pack_into(buf, 0, EXT_MAGIC, len(entries), capacity, depth, 0)
    off = 12
    for logical, physical, length in entries:
        if depth == 0:
            _EXT.pack_into(buf, off, logical, length, physical >> 32, physical & 0xFFFFFFFF)
        else:
            _IDX.pack_into(buf, off, logical, physical & 0xFFFFFFFF, physical >> 32, 0)
        off += 12
    return buf


# -- directories --------------------------------------------------------------------------------

_DIRENT = struct.Struct("<IHBB")


def dirent_size(name_len: int) -> int:
    """Bytes a dirent with a name of ``name_len`` bytes needs (8-byte head, 4-byte aligned)."""
    return (8 + name_len + 3) & ~3


def pack_dir_blocks(entries: Sequence[tuple[int, bytes, int]], *, csum_tail: bool
                    ) -> list[bytearray]:
    """Linear directory blocks for ``entries`` ((inode, name, file type), "." and ".." first),
    first-fit in order; each block's last entry stretches to the tail (checksum left zero)."""
    usable = BLOCK - (DIR_TAIL if csum_tail else 0)
    blocks: list[bytearray] = []
    buf = bytearray(BLOCK)
    pos = 0
    last = -1
    for ino, name, ftype in entries:
        need = dirent_size(len(name))
        if pos + need > usable:
            struct.pack_into("<H", buf, last + 4, usable - last)
            blocks.append(buf)
            buf = bytearray(BLOCK)
            pos = 0
        _DIRENT.pack_into(buf, pos, ino, need, len(name), ftype)
        buf[pos + 8:pos + 8 + len(name)] = name
        last = pos
        pos += need
    if last < 0:     # not reached: every directory has "." and ".."
        struct.pack_into("<IH", buf, 0, 0, usable)
    else:
        struct.pack_into("<H", buf, last + 4, usable - last)
    blocks.append(buf)
    if csum_tail:
        for block in blocks:
            _DIRENT.pack_into(block, BLOCK - DIR_TAIL, 0, DIR_TAIL, 0, 0xDE)
    return blocks


def empty_dir_block(*, csum_tail: bool) -> bytearray:
    """A directory block holding no entry (one unused dirent spanning it)."""
    buf = bytearray(BLOCK)
    usable = BLOCK - (DIR_TAIL if csum_tail else 0)
    _DIRENT.pack_into(buf, 0, 0, usable, 0, 0)
    if csum_tail:
        _DIRENT.pack_into(buf, usable, 0, DIR_TAIL, 0, 0xDE)
    return buf


def dir_blocks_needed(name_lens: Sequence[int], *, csum_tail: bool) -> int:
    """How many blocks :func:`pack_dir_blocks` makes for names of these lengths (with "."
    and ".." counted in by the caller)."""
    usable = BLOCK - (DIR_TAIL if csum_tail else 0)
    blocks, pos = 1, 0
    for n in name_lens:
        need = dirent_size(n)
        if pos + need > usable:
            blocks += 1
            pos = 0
        pos += need
    return blocks


# -- extended attributes ------------------------------------------------------------------------

#: (prefix, index) in the order they must be matched: whole names before namespaces
XATTR_PREFIXES = (("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
                  ("user.", 1), ("trusted.", 4), ("security.", 6), ("system.", 7))
_ACL_SHORT = {0x01, 0x04, 0x10, 0x20}      # USER_OBJ, GROUP_OBJ, MASK, OTHER: no id on disk
_ACL_LONG = {0x02, 0x08}                   # USER, GROUP


@dataclass(frozen=True, slots=True)
class Xattr:
    index: int
    name: bytes          # the suffix after the namespace prefix
    value: bytes

    @property
    def entry_size(self) -> int:
        return (16 + len(self.name) + 3) & ~3

    @property
    def value_size(self) -> int:
        return (len(self.value) + 3) & ~3

    def sort_key(self) -> tuple[int, int, bytes]:
        return (self.index, len(self.name), self.name)


def acl_to_disk(value: bytes) -> bytes:
    """A POSIX ACL in the VFS xattr format (version 2, 8-byte entries) in ext4's on-disk
    format (version 1; owner, group, mask and other entries without the id). A value that
    is not a well-formed VFS ACL is kept as it is."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        return value
    out = [struct.pack("<I", 1)]
    for off in range(4, len(value), 8):
        tag, perm, ident = struct.unpack_from("<HHI", value, off)
        if tag in _ACL_SHORT:
            out.append(struct.pack("<HH", tag, perm))
        elif tag in _ACL_LONG:
            out.append(struct.pack("<HHI", tag, perm, ident))
        else:
            return value
    return b"".join(out)


def split_xattr(name: str, value: bytes) -> Xattr:
    """The on-disk (index, suffix, value) of the xattr ``name``."""
    raw = name.encode("utf-8", "surrogateescape")
    for prefix, index in XATTR_PREFIXES:
        p = prefix.encode()
        if index in (2, 3):
            if raw == p:
                return Xattr(index, b"", acl_to_disk(value))
        elif raw.startswith(p):
            return Xattr(index, raw[len(p):], value)
    raise ValueError(f"xattr {name!r} is in no namespace ext4 knows")


def entry_hash(x: Xattr) -> int:
    """``e_hash``: the name's bytes (unsigned), then the value's 32-bit words."""
    h = 0
    for c in x.name:
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    if x.value:
        padded = x.value + b"\0" * (-len(x.value) % 4)
        for (word,) in struct.iter_unpack("<I", padded):
            h = ((h << 16) ^ (h >> 16) ^ word) & 0xFFFFFFFF
    return h


def block_hash(hashes: Sequence[int]) -> int:
    """``h_hash`` of an xattr block from its entries' hashes."""
    h = 0
    for e in hashes:
        h = ((h << 16) ^ (h >> 16) ^ e) & 0xFFFFFFFF
    return h


_XENTRY = struct.Struct("<BBHIII")


def _pack_entries(buf: bytearray, first: int, end: int, xattrs: Sequence[Xattr],
                  value_base: int) -> list[int]:
    """Entries from ``first`` up, values down from ``end``; value offsets relative to
    ``value_base``. Returns the entry hashes."""
    pos, vend = first, end
    hashes = []
    for x in xattrs:
        offs = 0
        if x.value:
            vend -= x.value_size
            buf[vend:vend + len(x.value)] = x.value
            offs = vend - value_base
        h = entry_hash(x)
        hashes.append(h)
        _XENTRY.pack_into(buf, pos, len(x.name), x.index, offs, 0, len(x.value), h)
        buf[pos + 16:pos + 16 + len(x.name)] = x.name
        pos += x.entry_size
    return hashes


#: in-inode xattr space: after the 128-byte base inode and the extra fields
INLINE_START = 128 + EXTRA_ISIZE
INLINE_SPACE = INODE_SIZE - INLINE_START - 4       # minus the magic header


def fits_inline(xattrs: Sequence[Xattr]) -> bool:
    """Whether these entries, their values and the terminator fit the inode."""
    return sum(x.entry_size + x.value_size for x in xattrs) + 4 <= INLINE_SPACE


def pack_inline_xattrs(buf: bytearray, off: int, xattrs: Sequence[Xattr]) -> None:
    """Write the in-inode xattr area of the inode at ``buf[off:]``."""
    start = off + INLINE_START
    struct.pack_into("<I", buf, start, XATTR_MAGIC)
    _pack_entries(buf, start + 4, off + INODE_SIZE, xattrs, start + 4)


def fits_block(xattrs: Sequence[Xattr]) -> bool:
    return 32 + sum(x.entry_size + x.value_size for x in xattrs) + 4 <= BLOCK


def xattr_block(xattrs: Sequence[Xattr], refcount: int) -> bytearray:
    """An external xattr block (entries sorted as the kernel's lookup expects; checksum 0)."""
    buf = bytearray(BLOCK)
    ordered = sorted(xattrs, key=Xattr.sort_key)
    hashes = _pack_entries(buf, 32, BLOCK, ordered, 0)
    struct.pack_into("<IIII", buf, 0, XATTR_MAGIC, refcount, 1, block_hash(hashes))
    return buf


# -- journal and orphan file ----------------------------------------------------------------------

def journal_superblock(blocks: int, uuid: bytes) -> bytearray:
    """A fresh, empty jbd2 v2 superblock (big-endian) as mke2fs writes it."""
    buf = bytearray(BLOCK)
    struct.pack_into(">IIIIIIIII", buf, 0, JBD2_MAGIC, 4, 0, BLOCK, blocks, 1, 1, 0, 0)
    buf[0x30:0x40] = uuid
    struct.pack_into(">I", buf, 0x40, 1)     # one user: this filesystem
    return buf


def journal_blocks(blocks: int) -> int:
    """mke2fs's default journal size (blocks) for a filesystem of ``blocks`` 4 KiB blocks."""
    for limit, size in ((32768, 1024), (256 << 10, 4096), (512 << 10, 8192),
                        (4096 << 10, 16384), (8192 << 10, 32768), (16384 << 10, 65536),
                        (32768 << 10, 131072)):
        if blocks < limit:
            return size
    return 262144


def orphan_file_blocks(blocks: int) -> int:
    """mke2fs's default orphan file size (blocks)."""
    if blocks < 128 << 10:
        return 32
    if blocks < 2 << 20:
        return blocks // 4096
    return 512


def orphan_block() -> bytearray:
    """An empty orphan-file block: zero slots, the magic; the checksum comes last."""
    buf = bytearray(BLOCK)
    struct.pack_into("<I", buf, BLOCK - 8, ORPHAN_MAGIC)
    return buf
