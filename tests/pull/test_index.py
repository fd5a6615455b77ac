"""The tar indexer on tricky real tars, and the index storage format."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import time

import pytest

from tests.support.imagebuilder import (
    TarEntry,
    concat_tars,
    directory,
    file,
    hardlink,
    make_tar,
    opaque,
    sparse_tar,
    symlink,
    whiteout,
)
from worker.cache.index import (
    EntryKind,
    IndexLimits,
    LayerIndex,
    TarIndex,
    dump_index,
    index_tar_stream,
    load_index,
    normalize_path,
)
from worker.errors import CorruptLayer, LayerError, LimitExceeded, UnsafeLayerEntry
from worker.pull.fetch import decompress_stream

LAYER = "sha256:" + "1" * 64


def chunks(data: bytes, size: int = 777) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def index(data: bytes, size: int = 777, **limits: int) -> TarIndex:
    return index_tar_stream(chunks(data, size), layer=LAYER, limits=IndexLimits(**limits))


def by_path(tar: bytes) -> dict:
    return {e.path: e for e in index(tar).entries}


def test_basic_kinds_offsets_and_diff_id() -> None:
    tar = make_tar([
        directory("./etc", mode=0o750, uid=1, gid=2),
        file("etc/passwd", b"root:x:0:0\n", mode=0o4755, mtime=1234567890),
        symlink("/lib", "usr/lib"),
        hardlink("etc/hard", "./etc/passwd"),
        TarEntry("dev/null", "char", devmajor=1, devminor=3),
        TarEntry("dev/sda", "block", devmajor=8, devminor=0),
        TarEntry("run/fifo", "fifo"),
        TarEntry(".", "dir"),
    ])
    result = index(tar)
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.uncompressed_size == len(tar)
    e = {x.path: x for x in result.entries}
    assert e["etc"].kind is EntryKind.DIR and e["etc"].mode == 0o750
    assert (e["etc"].uid, e["etc"].gid) == (1, 2)
    pw = e["etc/passwd"]
    assert pw.kind is EntryKind.FILE and pw.mode == 0o4755 and pw.mtime == 1234567890
    assert tar[pw.data_offset:pw.data_offset + pw.data_size] == b"root:x:0:0\n"
    assert tar[pw.header_offset:pw.header_offset + 512].rstrip(b"\0")  # a header block
    assert e["lib"].kind is EntryKind.SYMLINK and e["lib"].linkname == "usr/lib"
    assert e["etc/hard"].kind is EntryKind.HARDLINK and e["etc/hard"].linkname == "etc/passwd"
    assert (e["dev/null"].kind, e["dev/null"].devmajor, e["dev/null"].devminor) == \
        (EntryKind.CHAR, 1, 3)
    assert e["dev/sda"].kind is EntryKind.BLOCK
    assert e["run/fifo"].kind is EntryKind.FIFO
    assert e["."].kind is EntryKind.DIR


def test_whiteouts_and_opaque() -> None:
    tar = make_tar([whiteout("etc/shadow"), opaque("var/cache"), whiteout("toplevel"),
                    opaque(""), TarEntry("a/.wh..wh.plnk", "file"), file("a/keep", "x")])
    entries = index(tar).entries
    got = [(x.path, x.kind) for x in entries]
    assert got == [("etc/shadow", EntryKind.WHITEOUT), ("var/cache", EntryKind.OPAQUE),
                   ("toplevel", EntryKind.WHITEOUT), (".", EntryKind.OPAQUE),
                   ("a/keep", EntryKind.FILE)]


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_long_names_and_links(fmt: str) -> None:
    long_dir = "/".join(["d" * 60] * 5)
    tar = make_tar([file(f"{long_dir}/f", "x"), symlink(f"{long_dir}/s", "t" * 200),
                    hardlink(f"{long_dir}/h", f"./{long_dir}/f")], format=fmt)
    e = by_path(tar)
    assert e[f"{long_dir}/s"].linkname == "t" * 200
    assert e[f"{long_dir}/h"].linkname == f"{long_dir}/f"
    f = e[f"{long_dir}/f"]
    # header_offset points at the first extended header, before the real one
    assert f.header_offset == 0 and f.data_offset > 512
    assert tar[f.data_offset:f.data_offset + 1] == b"x"


def test_non_utf8_names_round_trip_and_big_ids() -> None:
    raw = b"caf\xe9/\xff\xfe"
    tar = make_tar([TarEntry("", "file", b"z", name_bytes=raw, uid=2 ** 40, gid=2 ** 33)],
                   format="gnu")
    (entry,) = index(tar).entries
    assert os.fsencode(entry.path) == raw
    assert (entry.uid, entry.gid) == (2 ** 40, 2 ** 33)
    li = LayerIndex(LAYER, LAYER, "m", "none", 1, 2, (entry,))
    assert os.fsencode(load_index(dump_index(li)).entries[0].path) == raw


def test_xattrs_schily_and_libarchive() -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\xff\x00"
    tar = make_tar([file("bin/ping", "elf", xattrs={"security.capability": cap,
                                                     "user.note": b"hi"})])
    (e,) = index(tar).entries
    assert dict(e.xattrs) == {"security.capability": cap, "user.note": b"hi"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("x")
        ti.pax_headers = {"LIBARCHIVE.xattr.user.a%3Db": "AAEC"}
        tf.addfile(ti)
    (e,) = index(buf.getvalue()).entries
    assert dict(e.xattrs) == {"user.a=b": b"\x00\x01\x02"}


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_sparse_files(fmt: str) -> None:
    size = 10 << 20
    tar = concat_tars(make_tar([file("before", "b")]),
                      sparse_tar("big/sparse", size, [(0, b"A" * 4096), (5 << 20, b"B" * 8192)],
                                 format=fmt),
                      make_tar([file("after", "a")]))
    e = by_path(tar)
    s = e["big/sparse"]
    assert s.kind is EntryKind.FILE and s.size == size
    assert s.sparse is not None and s.data_size == sum(n for _, n in s.sparse)
    data = tar[s.data_offset:s.data_offset + s.data_size]
    # the stored chunks, concatenated, are the file's non-hole content
    assert b"A" * 4096 in data and b"B" * 8192 in data
    a = e["after"]
    assert tar[a.data_offset:a.data_offset + 1] == b"a"


def test_paths_normalised_and_escapes_rejected() -> None:
    assert normalize_path("./a//b/./c/") == "a/b/c"
    assert normalize_path("/a/../b") == "b"
    assert normalize_path("./") == "."
    for bad in ["../etc/passwd", "a/../../x", "/.."]:
        with pytest.raises(UnsafeLayerEntry) as info:
            index(make_tar([file(bad, "x")]))
        assert LAYER in str(info.value) and bad in str(info.value)
    with pytest.raises(UnsafeLayerEntry, match="hardlink target"):
        index(make_tar([hardlink("a", "../../etc/shadow")]))
    with pytest.raises(UnsafeLayerEntry, match="whiteout"):
        index(make_tar([TarEntry("a/.wh...", "file")]))
    with pytest.raises(LayerError, match="empty target"):
        index(make_tar([symlink("a", "")]))


def test_nul_in_pax_name_rejected() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("x")
        ti.pax_headers = {"path": "evil\0name"}
        tf.addfile(ti)
    with pytest.raises(UnsafeLayerEntry, match="NUL"):
        index(buf.getvalue())


def test_limits_entries_and_path_length() -> None:
    tar = make_tar([file(f"f{i}") for i in range(20)])
    with pytest.raises(LimitExceeded) as info:
        index(tar, max_entries=10)
    assert "ROOTFS_EXPORT_MAX_ENTRIES" in str(info.value) and LAYER in str(info.value)
    with pytest.raises(LimitExceeded, match="path length"):
        index(make_tar([file("x" * 300)]), max_path_length=100)
    with pytest.raises(LimitExceeded, match="uncompressed layer size"):
        index(make_tar([file("big", b"\0" * 100_000)]), max_uncompressed_bytes=50_000)


def test_decompression_bomb_fails_fast_without_buffering() -> None:
    # ~1 MiB of gzip expanding to 1 GiB of zeros inside one tar member
    gib = 1 << 30
    header = make_tar([TarEntry("bomb", "file", b"")])[:512]
    ti = tarfile.TarInfo("bomb")
    ti.size = gib
    header = ti.tobuf(format=tarfile.GNU_FORMAT)
    comp = gzip.compress(header + b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros

    def stream():  # the same compressed block repeated: a stream of ~1 GiB of zeros
        yield comp
        zeros = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
        for _ in range(16):
            yield zeros

    start = time.monotonic()
    with pytest.raises(LimitExceeded) as info:
        index_tar_stream(decompress_stream(stream(), layer=LAYER), layer=LAYER,
                         limits=IndexLimits(max_uncompressed_bytes=8 << 20))
    assert time.monotonic() - start < 30  # generous: it must not inflate the whole GiB
    assert info.value.value <= (8 << 20) + (64 << 20) + (1 << 20)


def test_huge_pax_header_refused() -> None:
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type = tarfile.XHDTYPE
    hdr.size = 1 << 30
    data = hdr.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 4096
    with pytest.raises(LimitExceeded, match="extended tar header"):
        index(data)


def test_truncated_and_garbage_tars() -> None:
    tar = make_tar([file("a", b"x" * 5000), file("b", "y")])
    with pytest.raises(CorruptLayer) as info:
        index(tar[:2048])
    assert LAYER in str(info.value)
    with pytest.raises(CorruptLayer):
        index(b"this is not a tar archive at all" * 40)
    end = make_tar([file("a", "x")])
    with pytest.raises(CorruptLayer, match="garbage"):
        index(end[:1536] + b"GARBAGE" + b"\0" * 505 + end[2048:])


def test_empty_layers() -> None:
    assert index(b"").entries == ()
    r = index(b"\0" * 1024)
    assert r.entries == () and r.uncompressed_size == 1024


def test_index_storage_round_trip_and_corruption() -> None:
    tar = make_tar([directory("d"), file("d/f", "x", xattrs={"user.k": b"\xff\x00"}),
                    whiteout("d/g"), hardlink("d/h", "d/f")])
    tar = concat_tars(tar, sparse_tar("s", 1 << 20, [(4096, b"q" * 10)]))
    r = index(tar)
    li = LayerIndex(LAYER, r.diff_id, "application/vnd.oci.image.layer.v1.tar", "none",
                    len(tar), r.uncompressed_size, r.entries)
    data = dump_index(li)
    assert load_index(data) == li
    with pytest.raises(CorruptLayer):
        load_index(data[:-5])
    with pytest.raises(CorruptLayer):
        load_index(b"garbage")


def test_zstd_bomb_fails_fast_with_bounded_overshoot() -> None:
    import zstandard

    ti = tarfile.TarInfo("bomb")
    ti.size = 1 << 40
    c = zstandard.ZstdCompressor(level=19).compressobj()
    zeros = b"\0" * (64 << 20)
    parts = [c.compress(ti.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [c.compress(zeros) for _ in range(32)]          # 2 GiB of zeros ...
    blob = b"".join(parts) + c.flush()
    assert len(blob) < 1 << 20                               # ... in well under 1 MiB
    limit = 64 << 20
    with pytest.raises(LimitExceeded) as info:
        index_tar_stream(decompress_stream(chunks(blob, 1 << 20), layer=LAYER), layer=LAYER,
                         limits=IndexLimits(max_uncompressed_bytes=limit))
    # one decompression step adds at most ~32 MiB past the limit: nothing big is buffered
    assert info.value.value <= limit + (40 << 20)


def test_hostile_sparse_map_is_bounded() -> None:
    # a GNU sparse 1.0 member whose map claims a trillion chunks, followed by zeros
    ti = tarfile.TarInfo("s")
    ti.size = 64 << 20
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                      "GNU.sparse.name": "s", "GNU.sparse.realsize": "100"}
    head = ti.tobuf(format=tarfile.PAX_FORMAT)
    data = head + b"999999999999\n" + b"\0" * (64 << 20)
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="sparse map"):
        index(data, 1 << 20)
    assert time.monotonic() - start < 10


def _rechecksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    chk = sum(block)
    block[148:156] = b"%06o\0 " % chk
    return bytes(block)


def test_hostile_old_gnu_sparse_chain_is_bounded() -> None:
    ti = tarfile.TarInfo("s")
    ti.size = 0
    head = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT)[:512])
    head[156:157] = b"S"            # GNU sparse
    head[482] = 1                   # "more sparse headers follow"
    ext = bytearray(512)
    ext[504] = 1                    # ... and again, forever
    data = _rechecksum(head) + bytes(ext) * 20000
    with pytest.raises(LimitExceeded, match="sparse map"):
        index(data, 1 << 20)


def test_global_pax_headers_cannot_pile_up() -> None:
    globals_ = b"".join(tarfile.TarInfo.create_pax_global_header({f"comment.{i}": "x" * 200_000})
                        for i in range(8))
    data = globals_ + make_tar([file("f", "x")])
    with pytest.raises(LimitExceeded, match="global PAX header"):
        index(data, 1 << 20)
    # one modest global header is fine
    ok = tarfile.TarInfo.create_pax_global_header({"comment": "hi"}) + make_tar([file("f", "x")])
    assert [e.path for e in index(ok).entries] == ["f"]


@pytest.mark.parametrize("chunk_map", ["0,2,1,1", "5000,2,100,1"])
def test_sparse_map_that_overlaps_or_runs_backwards_is_refused(chunk_map: str) -> None:
    # GNU sparse 0.1: the stored bytes fill the chunks in map order, so such a map has no
    # single reading; it is refused naming the layer and the path
    ti = tarfile.TarInfo("weird/sparse")
    ti.size = 3
    ti.pax_headers = {"GNU.sparse.map": chunk_map, "GNU.sparse.size": "8192",
                      "GNU.sparse.numblocks": "2", "GNU.sparse.name": "weird/sparse"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(CorruptLayer, match="overlap or are out of order") as info:
        index(buf.getvalue())
    assert info.value.layer == LAYER and "weird/sparse" in str(info.value)
