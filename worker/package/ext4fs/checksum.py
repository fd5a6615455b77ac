"""CRC32C as ext4 uses it for metadata_csum (pure).

ext4 chains the *raw* Castagnoli CRC: the running value is the seed itself, with no final
inversion, so ``crc(crc(seed, a), b) == crc(seed, a + b)``. The ``crc32c`` package computes the
standard CRC (inverted on the way in and out); :func:`raw` undoes both inversions. Seeds:

* the filesystem seed is ``raw(~0, uuid)`` (stored in the superblock as ``s_checksum_seed``
  with ``metadata_csum_seed``, recomputed from the UUID otherwise);
* an inode's seed chains its number and generation (little-endian 32-bit) onto it, and
  seeds everything owned by that inode: the inode itself, extent blocks, directory blocks,
  orphan-file blocks;
* the superblock alone is checksummed from ``~0``.
"""

from __future__ import annotations

import struct

import crc32c

_MASK = 0xFFFFFFFF
_INO_GEN = struct.Struct("<II")


def raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """The raw (uninverted) CRC32C of ``data`` continuing from ``seed``."""
    return crc32c.crc32c(data, seed ^ _MASK) ^ _MASK


def fs_seed(uuid_bytes: bytes) -> int:
    """The filesystem checksum seed from its 16-byte UUID."""
    return raw(_MASK, uuid_bytes)


def inode_seed(seed: int, ino: int, generation: int = 0) -> int:
    """The per-inode seed (inode number, then generation)."""
    return raw(seed, _INO_GEN.pack(ino, generation))


def superblock_csum(sb: bytes | bytearray) -> int:
    """``s_checksum``: over the superblock up to the checksum field, from ~0."""
    return raw(_MASK, memoryview(sb)[:0x3FC])


def group_desc_csum(seed: int, group: int, desc: bytes | bytearray) -> int:
    """``bg_checksum`` (16 bits): group number, then the descriptor with the field as zero."""
    view = memoryview(desc)
    crc = raw(seed, struct.pack("<I", group))
    crc = raw(crc, view[:0x1E])
    crc = raw(crc, b"\0\0")
    crc = raw(crc, view[0x20:])
    return crc & 0xFFFF


def bitmap_csum(seed: int, bitmap: bytes | bytearray | memoryview) -> int:
    """Block or inode bitmap checksum (the caller passes exactly the bytes covered)."""
    return raw(seed, bitmap)


def inode_csum(ino_seed: int, inode: bytes | bytearray | memoryview) -> int:
    """Checksum of a whole on-disk inode whose two checksum fields are zero."""
    return raw(ino_seed, inode)


def xattr_block_csum(seed: int, block_nr: int, block: bytes | bytearray) -> int:
    """External xattr block: its block number (64-bit), then the block with h_checksum 0."""
    return raw(raw(seed, struct.pack("<Q", block_nr)), block)


def orphan_block_csum(ino_seed: int, block_nr: int,
                      payload: bytes | bytearray | memoryview) -> int:
    """Orphan-file block: the file's inode seed, the block's physical number, the slots."""
    return raw(raw(ino_seed, struct.pack("<Q", block_nr)), payload)
