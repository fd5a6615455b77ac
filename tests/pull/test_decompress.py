"""Layer decompression: multi-frame zstd, skippable frames, truncation, bounded pieces."""

from __future__ import annotations

import hashlib
import struct
import tarfile
from collections.abc import Iterator

import pytest
import zstandard

from tests.support.imagebuilder import file, make_tar
from worker.cache.decompress import CHUNK, decompress_chunks
from worker.cache.index import IndexLimits, index_tar_stream
from worker.errors import CorruptLayer
from worker.pull.fetch import decompress_stream

LAYER = "sha256:" + "d" * 64


def split(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


def frames(data: bytes, pieces: int) -> bytes:
    """``data`` as ``pieces`` independent zstd frames, the way parallel compressors and
    zstd:chunked layers write it, with a skippable frame between the first two."""
    c = zstandard.ZstdCompressor()
    step = -(-len(data) // pieces)
    out = [c.compress(data[i:i + step]) for i in range(0, len(data), step)]
    skippable = struct.pack("<II", 0x184D2A50, 8) + b"metadata"
    return out[0] + skippable + b"".join(out[1:])


TAR = make_tar([file(f"dir/f{i}", bytes([i]) * (3000 + i * 17)) for i in range(40)])


@pytest.mark.parametrize("size", [1, 333, 4096, 1 << 20])
def test_multi_frame_zstd_layer_is_read_whole(size: int) -> None:
    blob = frames(TAR, 5)
    assert b"".join(decompress_stream(split(blob, size), layer=LAYER)) == TAR
    assert b"".join(decompress_chunks(split(blob, size), "zstd", layer=LAYER)) == TAR
    tar = index_tar_stream(decompress_stream(split(blob, size), layer=LAYER), layer=LAYER,
                           limits=IndexLimits())
    assert tar.diff_id == "sha256:" + hashlib.sha256(TAR).hexdigest()
    assert len([e for e in tar.entries if e.path.startswith("dir/f")]) == 40


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_zstd_cut_inside_a_later_frame_is_truncated(cut: int) -> None:
    blob = frames(TAR, 3)
    with pytest.raises(CorruptLayer, match="zstd stream is truncated") as info:
        b"".join(decompress_stream(split(blob[:-cut], 500), layer=LAYER))
    assert info.value.layer == LAYER
    with pytest.raises(CorruptLayer, match="truncated"):
        b"".join(decompress_chunks(split(blob[:-cut], 500), "zstd", layer=LAYER))


def test_garbage_after_the_last_zstd_frame_is_corrupt() -> None:
    blob = frames(TAR, 2) + b"not a frame at all"
    with pytest.raises(CorruptLayer, match="zstd stream is corrupt"):
        b"".join(decompress_chunks(split(blob, 4096), "zstd", layer=LAYER))


def test_zstd_pieces_stay_bounded_when_reading_from_the_cache() -> None:
    # A highly compressible file, as a cached layer may legitimately hold: reading it back
    # gives pieces near CHUNK, never one buffer of the whole expansion.
    ti = tarfile.TarInfo("zeros")
    ti.size = 256 << 20
    c = zstandard.ZstdCompressor(level=3).compressobj()
    blob = c.compress(ti.tobuf(format=tarfile.GNU_FORMAT))
    blob += b"".join(c.compress(b"\0" * (16 << 20)) for _ in range(16)) + c.flush()
    assert len(blob) < 1 << 20
    biggest = total = 0
    for piece in decompress_chunks(split(blob, 1 << 20), "zstd", layer=LAYER):
        biggest = max(biggest, len(piece))
        total += len(piece)
    assert total == 512 + (256 << 20)
    assert biggest <= CHUNK + (40 << 20)


def test_zstd_opening_with_a_skippable_frame_is_sniffed_and_read() -> None:
    # pzstd and seekable-zstd writers start the stream with a skippable frame
    blob = struct.pack("<II", 0x184D2A5E, 4) + b"pzst" + frames(TAR, 2)
    assert b"".join(decompress_stream(split(blob, 4096), layer=LAYER)) == TAR
