"""The direct ext4 writer: e2fsck-clean images holding the same tree as the other methods."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from tests.package.conftest import leftovers, mounted_ro, needs_loop
from tests.package.helpers import (
    build,
    debugfs,
    dumpe2fs,
    fsck,
    make_plan,
    small_settings,
    tree_listing,
)
from tests.package.test_ext4 import rich_layers
from tests.support.imagebuilder import (
    Layer,
    TarEntry,
    concat_tars,
    directory,
    file,
    hardlink,
    make_tar,
    sparse_tar,
    symlink,
)
from worker.errors import Canceled, ConfigError, PackagingError
from worker.export import Ext4Method
from worker.package.ext4 import choose_method
from worker.package.ext4fs import checksum, layout, records
from worker.package.features import PROFILES

BIG_XATTR = {f"user.big{i}": bytes([i]) * 300 for i in range(3)}


def listing_and_links(image: Path, where: Path) -> tuple[dict[str, tuple], list[list[str]]]:
    """The mounted tree's listing and its hardlink groups (paths sharing an inode)."""
    with mounted_ro(image, where) as mnt:
        listing = tree_listing(mnt)
        by_ino: dict[int, list[str]] = {}
        for rel in listing:
            st = os.lstat(mnt / rel)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                by_ino.setdefault(st.st_ino, []).append(rel)
    return listing, sorted(sorted(group) for group in by_ino.values())


def edge_layers() -> list[Layer]:
    """Everything the writer's layout has a special case for."""
    many = [file(f"many/entry-{i:05d}-{'x' * (i % 40)}", str(i)) for i in range(3000)]
    sparse_big = 300 << 20
    fragmented = 700 << 20
    entries = [
        TarEntry(".", "dir", mode=0o755, mtime=1_600_000_000),
        directory("lost+found", mode=0o755, mtime=1_500_000_000, uid=5),
        file("lost+found/kept", "inside the image's own lost+found"),
        file("empty", b""),
        file("empty-too", b"", mode=0o600, mtime=1_650_000_000.75),
        symlink("s59", "a" * 59), symlink("s60", "b" * 60), symlink("s61", "c" * 61),
        symlink("s4095", "d" * 4095),
        file("n" * 255, "longest name"),
        directory("d" * 255),
        file(("d" * 255) + "/" + "e" * 255, "long path"),
        TarEntry("bytes-\udcfe\udcff", "file", data=b"latin", name_bytes=b"bytes-\xfe\xff"),
        file("xattr/outside-1", "1", xattrs=BIG_XATTR),
        file("xattr/outside-2", "2", xattrs=BIG_XATTR),
        file("xattr/mixed", "3", xattrs={"user.small": b"s", "trusted.big": b"t" * 500,
                                          "security.selinux": b"system_u:object_r:bin_t:s0\0"}),
        file("xattr/inline", "4", xattrs={"user.a": b"1", "user.b": b"22"}),
        symlink("xattr/link", "inline", xattrs={"user.on-link": b"yes"}),
        TarEntry("dev/big", "char", mode=0o600, devmajor=4095, devminor=1048575),
        TarEntry("dev/mid", "block", mode=0o600, devmajor=259, devminor=70000),
        TarEntry("dev/small", "char", mode=0o666, devmajor=5, devminor=255),
        TarEntry("dev/fifo", "fifo", mode=0o620),
        file("a/one/data", "shared across dirs", mode=0o751, uid=33, gid=44),
        hardlink("b/two/alias", "a/one/data"),
        hardlink("alias-at-root", "a/one/data"),
        # a link that sorts before its owner: the plan lists it first
        symlink("z-owner", "a/one/data"), hardlink("a-link-first", "z-owner"),
        file("huge/dense", bytes(range(256)) * ((130 << 20) // 256), mtime=1_700_000_000.5),
        *many,
    ]
    layers = [Layer.from_entries(entries, compression="gzip")]
    sparse = concat_tars(
        sparse_tar("sparse/hole-at-end", 5 << 20, [(0, b"head" * 1000)]),
        sparse_tar("sparse/big", sparse_big, [(0, b"start"), (200 << 20, b"middle"),
                                              (sparse_big - 3, b"end")]),
        # a chunk every 640 KiB: about 1100 extents, so the extent tree needs index blocks
        sparse_tar("sparse/fragmented", fragmented,
                   [(i * (640 << 10) + 100, b"%d" % i) for i in range(1100)]),
        make_tar([file("after-sparse", "still in stream order")]))
    layers.append(Layer(sparse, compression="none"))
    return layers


# -- the tree matches the other methods ----------------------------------------------------------

@needs_loop
def test_direct_matches_stream_mount_and_dir(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    trees = {}
    for method in ("direct", "stream", "mount", "dir"):
        out = tmp_path / f"{method}.ext4"
        result = build(plan, locate, out, method=method)
        assert str(result.method) == method
        check = fsck(out)
        assert check.returncode == 0, check.stdout + check.stderr
        trees[method] = listing_and_links(out, tmp_path / f"mnt-{method}")
        assert not leftovers(str(tmp_path))
    listing, links = trees["direct"]
    # spot checks against the input, so equal cannot mean equally wrong
    assert listing["var/sub-second/ns"][7] == 1_650_000_000_123_456_717
    assert listing["dev/loop0"][5] == "7:0" and listing["home/user/big-ids"][2] == 3_000_000_000
    assert ["etc/passwd", "etc/passwd-"] in links and ["usr/bin/sh", "usr/bin/sh-again"] in links
    for method in ("stream", "mount", "dir"):
        assert trees[method] == trees["direct"], method
    # atime and ctime as the dir method sets them (the entry's mtime), crtime the fixed clock
    text = debugfs(tmp_path / "direct.ext4", "stat /etc/passwd")
    assert re.search(r"ctime: 0x499602d2:00000000", text) and "crtime: 0x5e0be100" in text


@needs_loop
def test_direct_edge_cases_match_the_kernel(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, edge_layers())
    direct = build(plan, locate, tmp_path / "direct.ext4", method="direct")
    check = fsck(tmp_path / "direct.ext4")
    assert check.returncode == 0, check.stdout + check.stderr
    build(plan, locate, tmp_path / "mount.ext4", method="mount")
    got = listing_and_links(tmp_path / "direct.ext4", tmp_path / "m1")
    want = listing_and_links(tmp_path / "mount.ext4", tmp_path / "m2")
    assert got == want
    listing, links = got
    assert ["a/one/data", "alias-at-root", "b/two/alias"] in links
    assert ["a-link-first", "z-owner"] in links
    assert listing["dev/big"][5] == "4095:1048575" and listing["dev/mid"][5] == "259:70000"
    assert listing["s4095"][5] == "d" * 4095 and listing["s60"][5] == "b" * 60
    assert listing["empty-too"][4] == 0 and listing["empty-too"][7] == 1_650_000_000_750_000_000
    assert listing["bytes-\udcfe\udcff"][5] == hashlib.sha256(b"latin").hexdigest()
    assert dict(listing["xattr/mixed"][6])["trusted.big"] == b"t" * 500
    assert dict(listing["xattr/outside-2"][6]) == BIG_XATTR
    assert listing["sparse/big"][4] == 300 << 20
    image = tmp_path / "direct.ext4"
    # the image's own lost+found is inode 11 with its metadata and content
    text = debugfs(image, "stat /lost+found")
    assert text.startswith("Inode: 11") and "User:     5" in text
    assert "kept" in debugfs(image, "ls /lost+found")
    # fast symlinks below 60 bytes, one block from 60 on
    assert 'Fast link dest: "' + "a" * 59 in debugfs(image, "stat /s59")
    assert "EXTENTS:" in debugfs(image, "stat /s60")
    # a multi-block directory, an extent tree with index blocks, a dense file over one extent
    assert int(re.search(r"Size: (\d+)", debugfs(image, "stat /many")).group(1)) > 4096 * 20
    frag = debugfs(image, "stat /sparse/fragmented")
    assert "Level Entries" in debugfs(image, "dump_extents /sparse/fragmented")
    assert frag.count("(") > 1000
    dense = debugfs(image, "stat /huge/dense")
    assert len(re.findall(r"\(\d+-\d+\):", dense)) >= 2
    # holes stay holes: blocks only for the data chunks
    assert int(re.search(r"Blockcount: (\d+)", debugfs(image, "stat /sparse/big")).group(1)) \
        == 3 * 8
    hole_end = debugfs(image, "stat /sparse/hole-at-end")
    assert "Size: 5242880" in hole_end and "Blockcount: 8\n" in hole_end
    # identical external xattr blocks are shared, with a reference count
    acl1 = re.search(r"File ACL: (\d+)", debugfs(image, "stat /xattr/outside-1")).group(1)
    acl2 = re.search(r"File ACL: (\d+)", debugfs(image, "stat /xattr/outside-2")).group(1)
    assert acl1 == acl2 != "0"
    assert re.search(r"File ACL: 0", debugfs(image, "stat /xattr/inline"))
    assert direct.free_blocks > 0


def test_direct_is_byte_reproducible_and_clean(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    a = build(plan, locate, tmp_path / "a.ext4", method="direct")
    b = build(plan, locate, tmp_path / "b.ext4", method="direct")
    assert a.sha256 == b.sha256 == hashlib.sha256((tmp_path / "a.ext4").read_bytes()).hexdigest()
    assert fsck(tmp_path / "a.ext4").returncode == 0
    sb = dumpe2fs(tmp_path / "a.ext4")
    assert sb["Filesystem created"] == "Wed Jan  1 00:00:00 2020"
    assert sb["Orphan file inode"] == "12" and sb["Journal inode"] == "8"
    assert set(a.features) == set(PROFILES["default"]) - {"resize_inode"}
    assert a.extra()["ext4_method"] == "direct"
    # hashed while written: the digest covers the aligned file, holes included
    c = build(plan, locate, tmp_path / "c.ext4", method="direct", label="other",
              settings=small_settings(ext4_alignment=6 << 20))
    assert c.sha256 != a.sha256 and (tmp_path / "c.ext4").stat().st_size % (6 << 20) == 0
    assert c.sha256 == hashlib.sha256((tmp_path / "c.ext4").read_bytes()).hexdigest()


def test_direct_compat_profile_and_shrink(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    out = tmp_path / "compat.ext4"
    result = build(plan, locate, out, method="direct", features="compat", shrink=True)
    assert fsck(out).returncode == 0
    assert set(result.features) == set(PROFILES["compat"]) - {"resize_inode"}
    assert "Orphan file inode" not in dumpe2fs(out)


def test_direct_refuses_features_it_cannot_write(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("a", "a")]])
    with pytest.raises(ConfigError, match=r"inline_data.*\^metadata_csum|\^metadata_csum"):
        build(plan, locate, tmp_path / "x.ext4", method="direct",
              features="has_journal,extent,inline_data,64bit,flex_bg")
    assert not list(tmp_path.glob("*x.ext4*"))
    odd = ("has_journal,extent,huge_file,flex_bg,64bit,dir_nlink,extra_isize,sparse_super,"
           "large_file,filetype,dir_index,ext_attr")      # no metadata_csum
    method, _ = choose_method(plan, Ext4Method.AUTO, features=tuple(odd.split(",")))
    assert method != Ext4Method.DIRECT
    method, _ = choose_method(plan, Ext4Method.AUTO, features=PROFILES["default"],
                              direct_ok=False)
    assert method != Ext4Method.DIRECT


def test_direct_cancel_and_too_small_leave_nothing(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file(f"f{i}", os.urandom(50_000)) for i in range(50)]])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Canceled):
        build(plan, locate, tmp_path / "c.ext4", method="direct", cancel=cancel)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".c.ext4", "c.ext4"))]
    ok = build(plan, locate, tmp_path / "ok.ext4", method="direct", size=64 << 20)
    assert ok.fs_size == 64 << 20 and fsck(tmp_path / "ok.ext4").returncode == 0


# -- records and checksums against what e2fsprogs writes ------------------------------------------

def test_checksums_match_a_mke2fs_superblock(tmp_path: Path) -> None:
    from worker.package.e2fs import run_tool

    image = tmp_path / "ref.ext4"
    run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O",
              "metadata_csum,metadata_csum_seed,64bit", "-U",
              "11111111-2222-3333-4444-555555555555", str(image), "16M"])
    raw = image.read_bytes()
    sb = raw[1024:2048]
    assert checksum.superblock_csum(sb) == int.from_bytes(sb[0x3FC:0x400], "little")
    seed = checksum.fs_seed(sb[0x68:0x78])
    assert seed == int.from_bytes(sb[0x270:0x274], "little")
    desc = raw[4096:4096 + 64]
    assert checksum.group_desc_csum(seed, 0, desc) == int.from_bytes(desc[0x1E:0x20], "little")


def test_records_and_layout_units() -> None:
    assert layout.backup_groups(300) == (0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243)
    alloc = layout.Allocator(100_000, [(0, 2), (32768, 2), (65536, 2)])
    assert alloc.contiguous(3, "x") == 2
    alloc.cursor = 32760
    runs = alloc.runs(20, "y")
    assert runs == [(32760, 8), (32770, 12)]
    exts = layout.extents_for([(0, 20)], runs)
    assert exts == [(0, 32760, 8), (8, 32770, 12)]
    assert layout.extents_for([(0, 40000)], [(1000, 40000)]) == [
        (0, 1000, 32768), (32768, 33768, 7232)]
    # devices: old encoding when both numbers fit a byte, the new one otherwise
    assert records.device_block(1, 3) == (259).to_bytes(4, "little") + bytes(4)
    new = int.from_bytes(records.device_block(259, 70000)[4:8], "little")
    assert (new >> 8) & 0xFFF == 259 and (new & 0xFF) | ((new >> 12) & ~0xFF) == 70000
    # a time past 2038 keeps its epoch bits
    assert records.encode_time((1 << 32) + 5) == (5, 1)
    assert records.encode_time(-1) == (0xFFFFFFFF, 0)
    # ACLs are stored in ext4's short form
    acl = (2).to_bytes(4, "little") + bytes([1, 0, 6, 0, 255, 255, 255, 255])
    assert records.acl_to_disk(acl) == (1).to_bytes(4, "little") + bytes([1, 0, 6, 0])
    blocks = records.pack_dir_blocks([(2, b".", 2), (2, b"..", 2)]
                                     + [(20, b"x" * 200, 1)] * 40, csum_tail=True)
    assert len(blocks) == records.dir_blocks_needed([1, 2] + [200] * 40, csum_tail=True) == 3


def test_direct_truncated_layer_names_layer_and_path(tmp_path: Path) -> None:
    from worker.errors import CorruptLayer

    plan, locate = make_plan(tmp_path, [[file("first", b"a" * 10_000),
                                         file("second", os.urandom(300_000))]])
    blob = Path(locate(plan.layers[0]))
    data = blob.read_bytes()
    blob.write_bytes(data[:200_000])       # the second file's data is cut short
    with pytest.raises(CorruptLayer) as err:
        build(plan, locate, tmp_path / "out.ext4", method="direct")
    assert plan.layers[0].digest in str(err.value) and "'second'" in str(err.value)
    assert not [p for p in tmp_path.iterdir() if "out.ext4" in p.name]


@needs_loop
def test_direct_image_mounts_read_write_and_stays_clean(tmp_path: Path) -> None:
    # the kernel takes the journal, the orphan file and the linear directories as its own:
    # files created, grown, unlinked while open (through the orphan file) and a directory
    # filled until the kernel indexes it, then unmounted, leave a clean filesystem
    from worker.package.loop import loop_mounted

    plan, locate = make_plan(tmp_path, rich_layers())
    out = tmp_path / "rw.ext4"
    build(plan, locate, out, method="direct")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mounted(out, mnt, options="rw,nosuid,nodev") as root:
        (root / "etc/new").write_bytes(os.urandom(3 << 20))
        with open(root / "etc/passwd", "ab") as f:
            f.write(b"more\n")
        for i in range(400):
            (root / "usr/bin" / f"added-{i:04d}-{'y' * 60}").write_text(str(i))
        held = open(root / "etc/hostname", "rb")      # noqa: SIM115 - kept open on purpose
        os.unlink(root / "etc/hostname")
        held.close()
        os.rename(root / "srv/shared", root / "home/user/moved")
        os.sync()
    check = fsck(out)
    assert check.returncode == 0, check.stdout + check.stderr
    listing = debugfs(out, "ls /usr/bin")
    assert "added-0399-" in listing and "ping" in listing
    assert "moved" in debugfs(out, "ls /home/user")


@needs_loop
@pytest.mark.parametrize("method", ["direct", "stream"])
def test_times_beyond_ext4_range_are_clamped_as_the_kernel_does(tmp_path: Path,
                                                                method: str) -> None:
    low, high = -(2 ** 31), 2 ** 31 - 1 + 3 * 2 ** 32
    cases = {"max": high, "past-max": 2 ** 34 - 1, "far": 2 ** 40, "huge": 1e300,
             "min": low, "below-min": low - 5, "far-past": -(2 ** 40), "old": -1_000_000,
             "neg-frac": -1.5, "tiny-neg": -1e-9, "neg-huge": -1e300}
    plan, locate = make_plan(tmp_path, [[file(name, b"x", mtime=t) for name, t in cases.items()]])
    image = tmp_path / f"{method}.ext4"
    build(plan, locate, image, method=method)
    with mounted_ro(image, tmp_path / "m") as mnt:
        got = {name: os.lstat(mnt / name).st_mtime_ns for name in cases}
    want = {"max": high, "past-max": high, "far": high, "huge": high,
            "min": low, "below-min": low, "far-past": low, "old": -1_000_000,
            "neg-huge": low}
    assert got == {**{k: v * 1_000_000_000 for k, v in want.items()},
                   "neg-frac": -1_500_000_000, "tiny-neg": -1}


def test_many_small_files_get_smaller_groups_like_mke2fs(tmp_path: Path) -> None:
    # 40k empty files need more inodes than one 32768-block group can hold: like mke2fs,
    # the writer makes more, smaller groups instead of refusing the image
    entries = [directory(f"d{i:02d}") for i in range(40)]
    entries += [file(f"d{i % 40:02d}/f{i}", b"") for i in range(40_000)]
    entries.append(file("d00/data", b"payload" * 1000))
    plan, locate = make_plan(tmp_path, [entries])
    image = tmp_path / "many.ext4"
    built = build(plan, locate, image, method="direct")
    check = fsck(image)
    assert check.returncode == 0, check.stdout + check.stderr
    sb = dumpe2fs(image)
    assert int(sb["Blocks per group"]) < 32768 and int(sb["Inodes per group"]) <= 32768
    assert built.inodes >= 40_000 + 41
    assert "f39999" in debugfs(image, "ls /d39")
    assert debugfs(image, "cat /d00/data") == "payload" * 1000


def test_xattrs_too_big_for_one_block_name_the_path(tmp_path: Path) -> None:
    big = {f"user.k{i}": bytes([65 + i]) * 1500 for i in range(4)}
    plan, locate = make_plan(tmp_path, [[directory("etc"), file("etc/heavy", b"x", xattrs=big)]])
    with pytest.raises(PackagingError, match=r"'etc/heavy': its xattrs \(6000 bytes"):
        build(plan, locate, tmp_path / "x.ext4", method="direct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]   # no image, no temp
