"""ext4 packaging by all three methods, from real tars, checked with real e2fsprogs."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.package.conftest import LOOP_SKIP, leftovers, mounted_ro, needs_loop
from tests.package.helpers import (
    build,
    debugfs,
    dumpe2fs,
    fsck,
    make_plan,
    small_settings,
    stat_times,
    tree_listing,
)
from tests.support.imagebuilder import (
    Layer,
    TarEntry,
    directory,
    file,
    hardlink,
    sparse_tar,
    symlink,
    whiteout,
)
from worker.errors import Canceled, ConfigError, PackagingError

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)   # cap_net_raw+ep
# POSIX ACL in the VFS xattr format: user::rw- user:1000:r-- group::r-- mask::r-- other::---
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
    [(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
     (0x20, 0, 0xFFFFFFFF)])


def rich_layers() -> list[list[TarEntry]]:
    """A tree with every kind of entry and metadata the methods must agree on."""
    lower = [
        TarEntry(".", "dir", mode=0o755, mtime=1_500_000_000),
        directory("etc", mtime=1_400_000_000),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", mtime=1_234_567_890),
        file("etc/shadow", "root:*:19000::::::\n", mode=0o000, mtime=1_234_567_891),
        file("etc/old", "to be deleted"),
        directory("usr/bin", mtime=1_300_000_000),
        file("usr/bin/ping", b"\x7fELF" + bytes(5000), mode=0o4755,
             xattrs={"security.capability": CAP}),
        file("usr/bin/tagged", "x", xattrs={"user.origin": b"layer0", "trusted.t": b"\x00\x01"}),
        file("srv/shared", "acl", mode=0o640, xattrs={"system.posix_acl_access": ACL}),
        file("srv/binary-xattrs", "b", xattrs={"user.empty": b"", "user.bin": b"\0\n\"\xff" * 50,
                                               "trusted.overlay.opaque": b"y"}),
        symlink("usr/bin/sh", "dash"),
        symlink("usr/lib-long", "/" + "very-long-target/" * 8),
        hardlink("usr/bin/sh-again", "usr/bin/sh"),
        hardlink("etc/passwd-", "etc/passwd"),
        TarEntry("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        TarEntry("dev/loop0", "block", mode=0o660, gid=6, devmajor=7, devminor=0),
        TarEntry("run/initctl", "fifo", mode=0o600),
        directory("home/user", uid=1000, gid=1000, mode=0o700, mtime=1_600_000_000),
        file("home/user/big-ids", "z", uid=3_000_000_000, gid=4_000_000_000),
        directory("tmp", mode=0o1777),
        file("empty", b""),
        TarEntry("non-utf8-\udcff", "file", data=b"n", name_bytes=b"non-utf8-\xff"),
        file("usr/share/café/ünïcødé 名前", "utf8", xattrs={"user.é": "ü".encode()}),
        symlink("usr/share/lien-é", "café/ünïcødé 名前"),
        file("dir with space/\"quoted\" name", "q", xattrs={"user.q": b"v"}),
        directory("ro", mode=0o555),
        file("ro/inside", "still written"),
    ]
    upper = [whiteout("etc/old"), file("etc/hostname", "vm\n", mtime=1_700_000_000),
             directory("var/sub-second", mtime=1_650_000_000.25),
             file("var/sub-second/ns", "ns", mtime=1_650_000_000.123456789),
             symlink("var/sub-second/link", "ns", mtime=1_650_000_000.5)]
    return [lower, upper]


def listing_of(image: Path, where: Path) -> dict[str, tuple]:
    with mounted_ro(image, where) as mnt:
        return tree_listing(mnt)


# -- every method: clean, and the same tree --------------------------------------------------------

@needs_loop
def test_three_methods_build_clean_equivalent_trees(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    listings: dict[str, dict[str, tuple]] = {}
    for method in ("stream", "mount", "dir"):
        out = tmp_path / f"{method}.ext4"
        result = build(plan, locate, out, method=method)
        assert str(result.method) == method
        check = fsck(out)
        assert check.returncode == 0, check.stdout + check.stderr
        sb = dumpe2fs(out)
        assert sb["Last mounted on"] == "<not available>" and sb["Mount count"] == "0"
        listings[method] = listing_of(out, tmp_path / f"mnt-{method}")
        assert not leftovers(str(tmp_path))
    stream = listings["stream"]
    # spot checks against the input, so "equal" cannot mean "equally wrong"
    assert "etc/old" not in stream
    assert stream["etc/shadow"][1] == 0o000
    assert stream["usr/bin/ping"][1] == 0o4755
    assert ("security.capability", CAP) in stream["usr/bin/ping"][6]
    assert ("user.origin", b"layer0") in stream["usr/bin/tagged"][6]
    assert ("trusted.t", b"\x00\x01") in stream["usr/bin/tagged"][6]
    assert ("system.posix_acl_access", ACL) in stream["srv/shared"][6]
    assert dict(stream["srv/binary-xattrs"][6]) == {
        "user.empty": b"", "user.bin": b"\0\n\"\xff" * 50, "trusted.overlay.opaque": b"y"}
    assert stream["dev/null"][0] == stat.S_IFCHR and stream["dev/null"][5] == "1:3"
    assert stream["dev/loop0"][0] == stat.S_IFBLK and stream["dev/loop0"][3] == 6
    assert stream["run/initctl"][0] == stat.S_IFIFO
    assert stream["home/user/big-ids"][2:4] == (3_000_000_000, 4_000_000_000)
    assert stream["etc/passwd"][7] == 1_234_567_890 * 10**9
    assert stream["var/sub-second"][7] == 1_650_000_000_250_000_000
    # the float's exact value to the nanosecond (round(mtime * 1e9) would give ...768)
    assert stream["var/sub-second/ns"][7] == 1_650_000_000_123_456_717
    assert stream["var/sub-second/link"][7] == 1_650_000_000_500_000_000
    assert stream["usr/lib-long"][5] == "/" + "very-long-target/" * 8
    assert stream["non-utf8-\udcff"][5] == hashlib.sha256(b"n").hexdigest()
    assert stream["usr/share/café/ünïcødé 名前"][5] == hashlib.sha256(b"utf8").hexdigest()
    assert ("user.é", "ü".encode()) in stream["usr/share/café/ünïcødé 名前"][6]
    assert stream["usr/share/lien-é"][5] == "café/ünïcødé 名前"
    assert stream["ro/inside"][5] == hashlib.sha256(b"still written").hexdigest()
    assert stream["."][1:4] == (0o755, 0, 0) if "." in stream else True
    for method in ("mount", "dir"):
        assert listings[method] == stream, method


@needs_loop
def test_hardlinks_share_inodes_in_every_method(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    for method in ("stream", "mount", "dir"):
        out = tmp_path / f"{method}.ext4"
        build(plan, locate, out, method=method)
        with mounted_ro(out, tmp_path / f"m-{method}") as mnt:
            a, b = os.lstat(mnt / "etc/passwd"), os.lstat(mnt / "etc/passwd-")
            assert a.st_ino == b.st_ino and a.st_nlink == 2, method
            s1, s2 = os.lstat(mnt / "usr/bin/sh"), os.lstat(mnt / "usr/bin/sh-again")
            assert stat.S_ISLNK(s1.st_mode) and s1.st_ino == s2.st_ino, method
            root = os.lstat(mnt)
            assert (stat.S_IMODE(root.st_mode), root.st_uid, int(root.st_mtime)) == \
                (0o755, 0, 1_500_000_000), method


def test_stream_hardlinked_inodes_keep_their_owners_metadata(tmp_path: Path) -> None:
    # Each link entry says something else than its inode's owner; mke2fs -d - applies the last
    # hardlink header's metadata to the inode, with no debugfs fix-up afterwards.
    plan, locate = make_plan(tmp_path, [
        [file("bin/tool", "T", mode=0o4750, uid=1001, gid=1002, mtime=1_500_000_000,
              xattrs={"security.capability": CAP, "user.k": b"owner"}),
         file("bin/name\nwith-newline", "N", mode=0o640, uid=5, gid=6, mtime=1_400_000_000,
              xattrs={"security.capability": CAP}),
         symlink("bin/sl", "tool", uid=11, gid=12, mtime=1_300_000_000)],
        [hardlink("bin/alias", "bin/tool", mode=0o600, uid=7, gid=8, mtime=1_700_000_000),
         hardlink("bin/nl-alias", "bin/name\nwith-newline", mode=0o777, uid=9, gid=9,
                  mtime=1_700_000_000),
         hardlink("bin/sl-alias", "bin/sl", uid=13, gid=14, mtime=1_700_000_000)]])
    out = tmp_path / "links.ext4"
    assert str(build(plan, locate, out).method) == "stream"
    assert fsck(out).returncode == 0
    for link, (mode, uid, gid, mtime) in {
            "/bin/alias": (0o104750, 1001, 1002, 1_500_000_000),
            "/bin/nl-alias": (0o100640, 5, 6, 1_400_000_000),
            "/bin/sl-alias": (0o120777, 11, 12, 1_300_000_000)}.items():
        text = debugfs(out, f"stat {link}")
        assert f"Mode:  0{mode & 0o7777:o}" in text or f"Mode:  {mode & 0o7777:04o}" in text, text
        assert f"User: {uid:5d}   Group: {gid:5d}" in text, text
        assert "Links: 2" in text, text
        assert stat_times(out, link)["mtime"] == mtime
    assert "security.capability" in debugfs(out, "ea_list /bin/nl-alias")
    assert "user.k" in debugfs(out, "ea_list /bin/alias")


def test_stream_is_rootless_friendly_and_clean(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    out = tmp_path / "root.ext4"
    result = build(plan, locate, out)
    assert fsck(out).returncode == 0
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.output_size == out.stat().st_size
    assert result.extra()["e2fsprogs"].startswith("1.47")
    assert result.extra()["ext4_method"] == "stream" and result.extra()["block_size"] == 4096
    assert "user.origin" in debugfs(out, "ea_list /usr/bin/tagged")
    listing = debugfs(out, "ls -l /etc")
    assert "old" not in listing.split() and "hostname" in listing


# -- reproducibility --------------------------------------------------------------------------------

def test_same_input_and_options_give_identical_bytes(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    a = build(plan, locate, tmp_path / "a.ext4")
    b = build(plan, locate, tmp_path / "b.ext4")
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.ext4").read_bytes() == (tmp_path / "b.ext4").read_bytes()
    # files keep their own mtimes; the filesystem's own times are the fixed clock
    assert stat_times(tmp_path / "a.ext4", "/etc/passwd")["mtime"] == 1_234_567_890
    assert stat_times(tmp_path / "a.ext4", "/etc/hostname")["mtime"] == 1_700_000_000
    assert stat_times(tmp_path / "a.ext4", "/home/user")["mtime"] == 1_600_000_000
    sb = dumpe2fs(tmp_path / "a.ext4")
    assert sb["Filesystem created"] == "Wed Jan  1 00:00:00 2020"
    # the dir method too: the staging tree's build-time atimes and ctimes do not leak in
    e = build(plan, locate, tmp_path / "e.ext4", method="dir")
    f = build(plan, locate, tmp_path / "f.ext4", method="dir")
    assert e.sha256 == f.sha256
    assert stat_times(tmp_path / "e.ext4", "/etc/passwd")["ctime"] == 1_234_567_890
    # another image digest or other options: another UUID (and bytes)
    c = build(plan, locate, tmp_path / "c.ext4", identity="sha256:" + "cd" * 32)
    d = build(plan, locate, tmp_path / "d.ext4", label="other")
    assert len({a.uuid, c.uuid, d.uuid}) == 3
    assert len({a.sha256, c.sha256, d.sha256}) == 3


# -- features, label, alignment, sizing --------------------------------------------------------------

def test_feature_profiles_and_label(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("a", "a")]])
    default = build(plan, locate, tmp_path / "default.ext4", label="myroot")
    compat = build(plan, locate, tmp_path / "compat.ext4", features="compat")
    explicit = build(plan, locate, tmp_path / "explicit.ext4",
                     features="has_journal,extent,dir_index,filetype,sparse_super,large_file")
    dflt = dumpe2fs(tmp_path / "default.ext4")["Filesystem features"].split()
    comp = dumpe2fs(tmp_path / "compat.ext4")["Filesystem features"].split()
    expl = dumpe2fs(tmp_path / "explicit.ext4")["Filesystem features"].split()
    assert {"metadata_csum_seed", "orphan_file", "metadata_csum", "64bit"} <= set(dflt)
    assert "metadata_csum_seed" not in comp and "orphan_file" not in comp
    assert {"metadata_csum", "extent", "has_journal", "flex_bg"} <= set(comp)
    assert "metadata_csum" not in expl and "flex_bg" not in expl and "extent" in expl
    assert dumpe2fs(tmp_path / "default.ext4")["Filesystem volume name"] == "myroot"
    assert default.label == "myroot"
    assert dumpe2fs(tmp_path / "default.ext4")["Block size"] == "4096"
    assert dumpe2fs(tmp_path / "default.ext4")["Reserved block count"] == "0"
    for out in ("default", "compat", "explicit"):
        assert fsck(tmp_path / f"{out}.ext4").returncode == 0
    assert compat.features and explicit.features


def test_bad_label_and_features_are_config_errors(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("a", "a")]])
    with pytest.raises(ConfigError, match="16 bytes"):
        build(plan, locate, tmp_path / "x.ext4", label="a-label-far-too-long")
    with pytest.raises(ConfigError, match="malformed"):
        build(plan, locate, tmp_path / "x.ext4", features="extent;rm -rf")
    assert not list(tmp_path.glob("x.ext4*")) and not list(tmp_path.glob(".x.ext4*"))


def test_size_is_aligned_sparse_and_has_headroom(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("blob", os.urandom(3 << 20))]])
    settings = small_settings(ext4_alignment=6 << 20, ext4_min_free=20 << 20)
    out = tmp_path / "a.ext4"
    result = build(plan, locate, out, settings=settings)
    assert out.stat().st_size % (6 << 20) == 0
    assert result.output_size == out.stat().st_size
    assert result.free_blocks * 4096 >= 20 << 20
    # sparse: far fewer bytes allocated than the apparent size
    assert out.stat().st_blocks * 512 < out.stat().st_size // 2


def test_explicit_size_too_small_names_the_sizes(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("blob", os.urandom(12 << 20))]])
    with pytest.raises(PackagingError, match=r"--size 8M is too small.*12M") as err:
        build(plan, locate, tmp_path / "small.ext4", size=8 << 20)
    assert "at least --size" in str(err.value)
    assert not list(tmp_path.glob("*small.ext4*"))
    ok = build(plan, locate, tmp_path / "ok.ext4", size=64 << 20)
    assert ok.fs_size == 64 << 20 and fsck(tmp_path / "ok.ext4").returncode == 0
    # the suggested minimum really is enough
    suggested = str(err.value).split("at least --size ")[1].split()[0]
    minimum = int(float(suggested[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suggested[-1]])
    tight = build(plan, locate, tmp_path / "tight.ext4", size=minimum)
    assert fsck(tmp_path / "tight.ext4").returncode == 0 and tight.fs_size < 64 << 20


def test_shrink_then_headroom(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file(f"d/f{i}", os.urandom(20000)) for i in range(200)]])
    settings = small_settings(ext4_min_free=16 << 20, ext4_headroom=0.0)
    big = build(plan, locate, tmp_path / "big.ext4", settings=settings, size=256 << 20)
    small = build(plan, locate, tmp_path / "small.ext4", settings=settings, shrink=True)
    assert small.fs_size < big.fs_size
    assert small.free_blocks * 4096 >= 16 << 20
    assert small.output_size % (2 << 20) == 0
    assert fsck(tmp_path / "small.ext4").returncode == 0
    again = build(plan, locate, tmp_path / "small2.ext4", settings=settings, shrink=True)
    assert again.sha256 == small.sha256


def test_hundred_thousand_tiny_files_never_run_out_of_inodes(tmp_path: Path) -> None:
    entries = [directory(f"d{i}") for i in range(100)]
    entries += [file(f"d{i % 100}/f{i}", b"x") for i in range(100_000)]
    plan, locate = make_plan(tmp_path, [entries])
    out = tmp_path / "many.ext4"
    result = build(plan, locate, out)
    assert fsck(out).returncode == 0
    assert result.inodes - result.free_inodes >= 100_100
    assert result.free_inodes >= 1024
    assert "f99999" in debugfs(out, "ls /d99")


def test_sparse_file_over_2_gib_stays_sparse(tmp_path: Path) -> None:
    size = (2 << 30) + (512 << 20)
    layer = Layer(sparse_tar("data/sparse.img", size, [(0, b"head"), (size - 4, b"tail")]),
                  compression="none")
    plan, locate = make_plan(tmp_path, [layer])
    out = tmp_path / "sparse.ext4"
    result = build(plan, locate, out)
    assert fsck(out).returncode == 0
    st = debugfs(out, "stat /data/sparse.img")
    assert f"Size: {size}" in st
    blockcount = int(st.split("Blockcount:")[1].split()[0])   # 512-byte sectors
    assert blockcount <= 64
    assert result.output_size < 1 << 30    # sized from the data, not the apparent size
    assert out.stat().st_blocks * 512 < 200 << 20
    # data blocks exactly where the data is: the first and the last block of the file
    extents = st.split("EXTENTS:")[1]
    last_block = (size - 1) // 4096
    assert "(0):" in extents and f"({last_block}):" in extents


# -- failures leave nothing behind ---------------------------------------------------------------

def _no_partial(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]


def test_stream_writer_failure_surfaces_and_leaves_nothing(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())

    def broken(f: Any) -> None:
        f.write(b"\0" * 4096)
        raise OSError("layer vanished")

    with pytest.raises(PackagingError, match="layer vanished"):
        build(plan, locate, tmp_path / "out.ext4", write_tar_fn=broken)
    _no_partial(tmp_path, "out.ext4")


def test_mke2fs_failure_surfaces_its_stderr(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())

    def garbage(f: Any) -> None:
        for _ in range(64):   # more than a pipe holds: mke2fs dies first, no deadlock
            f.write(b"this is not a tar archive " * 4096)

    with pytest.raises(PackagingError, match="mke2fs") as err:
        build(plan, locate, tmp_path / "out.ext4", write_tar_fn=garbage)
    assert "archive" in str(err.value).lower()
    _no_partial(tmp_path, "out.ext4")


def test_cancel_removes_partial_image(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    cancel = threading.Event()

    def slow(f: Any) -> None:
        cancel.set()
        import time
        for _ in range(100):
            time.sleep(0.05)
            f.write(bytes(512))

    with pytest.raises(Canceled):
        build(plan, locate, tmp_path / "out.ext4", write_tar_fn=slow, cancel=cancel)
    _no_partial(tmp_path, "out.ext4")


@needs_loop
@pytest.mark.parametrize("failure", [OSError("disk on fire"), KeyboardInterrupt()])
def test_mount_method_failure_unmounts_and_detaches(tmp_path: Path, failure: BaseException
                                                     ) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    seen: list[Path] = []

    def failing(target: Path) -> None:
        from worker.flatten.dirout import apply_plan
        seen.append(target)
        apply_plan(plan, target, locate)
        assert os.path.ismount(target)
        raise failure

    with pytest.raises(type(failure)):
        build(plan, locate, tmp_path / "fail.ext4", method="mount", write_dir_fn=failing)
    assert seen
    assert not os.path.exists(seen[0])
    assert leftovers(str(tmp_path)) == []
    _no_partial(tmp_path, "fail.ext4")


@needs_loop
def test_mount_method_cancel_mid_apply_cleans_up(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file(f"f{i}", os.urandom(256 << 10)) for i in range(16)]])
    cancel = threading.Event()
    seen: list[Path] = []

    def canceling(target: Path) -> None:
        from worker.flatten.dirout import apply_plan
        seen.append(target)
        cancel.set()     # as if the user pressed cancel while the writer runs
        apply_plan(plan, target, locate, cancel=cancel)

    with pytest.raises(Canceled):
        build(plan, locate, tmp_path / "c.ext4", method="mount", write_dir_fn=canceling,
              cancel=cancel)
    assert seen and not os.path.exists(seen[0])
    assert leftovers(str(tmp_path)) == []
    _no_partial(tmp_path, "c.ext4")


def test_dir_method_failure_removes_staging(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, rich_layers())
    seen: list[Path] = []

    def failing(target: Path) -> None:
        seen.append(target)
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
        (target / "partial").write_text("x")
        raise OSError("no more")

    with pytest.raises(OSError, match="no more"):
        build(plan, locate, tmp_path / "d.ext4", method="dir", write_dir_fn=failing)
    assert seen and not seen[0].exists()
    _no_partial(tmp_path, "d.ext4")


def test_loop_skip_reason_is_only_missing_loop_devices() -> None:
    # Loop tests may skip only where the machine lacks loop devices (or root), saying so.
    assert LOOP_SKIP is None or "loop" in LOOP_SKIP


# -- method choice, odd trees, progress ----------------------------------------------------------

def test_auto_prefers_stream_and_avoids_it_when_it_cannot_reproduce(tmp_path: Path) -> None:
    from worker.export import Ext4Method
    from worker.package.ext4 import choose_method

    plan, _ = make_plan(tmp_path, rich_layers())
    assert choose_method(plan, Ext4Method.AUTO)[0] == Ext4Method.STREAM
    # xattrs that only debugfs can add, on a name debugfs cannot address
    odd, _ = make_plan(tmp_path / "odd", [[file("a\nb", "x", xattrs={"user.k": b"v"})]])
    with pytest.raises(PackagingError, match="cannot reproduce"):
        choose_method(odd, Ext4Method.STREAM)
    # a hardlinked inode debugfs cannot name needs no fixing: the link header carries its metadata
    linked, _ = make_plan(tmp_path / "linked", [[file("x\ny", "x", mtime=5), hardlink("z", "x\ny")]])
    assert choose_method(linked, Ext4Method.STREAM) == (Ext4Method.STREAM, [])
    if LOOP_SKIP is None:
        assert choose_method(odd, Ext4Method.AUTO)[0] == Ext4Method.MOUNT


@needs_loop
def test_auto_uses_direct_or_mount_for_a_huge_directory(tmp_path: Path) -> None:
    from worker.export import Ext4Method
    from worker.package.ext4 import STREAM_DIR_LIMIT, choose_method, largest_directory
    from worker.package.features import PROFILES

    n = STREAM_DIR_LIMIT + 1
    plan, locate = make_plan(tmp_path, [[file(f"many/f{i}", b"") for i in range(n)]])
    assert largest_directory(plan) == ("many", n)
    # without the direct writer (blobs not at hand, or features it does not write): mount
    assert choose_method(plan, Ext4Method.AUTO)[0] == Ext4Method.MOUNT
    assert choose_method(plan, Ext4Method.AUTO, features=("has_journal", "extent"))[0] \
        == Ext4Method.MOUNT
    assert choose_method(plan, Ext4Method.AUTO, features=PROFILES["default"])[0] \
        == Ext4Method.DIRECT
    result = build(plan, locate, tmp_path / "many.ext4", method="auto")
    assert str(result.method) == "direct" and fsck(tmp_path / "many.ext4").returncode == 0
    assert result.inodes - result.free_inodes >= n
    # the same directory by the kernel: the same names
    mount = build(plan, locate, tmp_path / "mount.ext4", method="mount")
    assert str(mount.method) == "mount"
    with mounted_ro(tmp_path / "many.ext4", tmp_path / "m1") as mnt:
        direct_names = sorted(os.listdir(mnt / "many"))
    with mounted_ro(tmp_path / "mount.ext4", tmp_path / "m2") as mnt:
        assert sorted(os.listdir(mnt / "many")) == direct_names
    assert len(direct_names) == n


@needs_loop
def test_lost_found_from_the_image_is_merged(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[directory("lost+found", mode=0o700, mtime=1_500_000_000),
                                         file("lost+found/#12", "recovered"), file("a", "a")]])
    listings: dict[str, dict[str, tuple]] = {}
    for method in ("direct", "stream", "mount", "dir"):
        out = tmp_path / f"{method}.ext4"
        build(plan, locate, out, method=method)
        assert fsck(out).returncode == 0, method
        with mounted_ro(out, tmp_path / f"m-{method}") as mnt:
            listings[method] = tree_listing(mnt, skip=())
    assert listings["stream"]["lost+found/#12"][5] == hashlib.sha256(b"recovered").hexdigest()
    assert listings["stream"] == listings["mount"] == listings["dir"] == listings["direct"]


def test_lost_found_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("lost+found", "hostile")]])
    for method in ("stream", "dir"):
        with pytest.raises(PackagingError, match="lost\\+found as a file"):
            build(plan, locate, tmp_path / "x.ext4", method=method)
    _no_partial(tmp_path, "x.ext4")


def test_conflicting_or_impossible_requests(tmp_path: Path) -> None:
    plan, locate = make_plan(tmp_path, [[file("a", "a")]])
    with pytest.raises(ConfigError, match="--size and --shrink"):
        build(plan, locate, tmp_path / "x.ext4", size=64 << 20, shrink=True)
    with pytest.raises(ConfigError, match="stdout"):
        build(plan, locate, Path("-"))
    with pytest.raises(PackagingError, match="does not exist"):
        build(plan, locate, tmp_path / "no-such-dir" / "x.ext4")
    with pytest.raises(ConfigError, match="ROOTFS_EXPORT_EXT4_ALIGNMENT"):
        build(plan, locate, tmp_path / "x.ext4", settings=small_settings(ext4_alignment=1000))
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(PackagingError, match="is a directory"):
        build(plan, locate, tmp_path / "a-dir")
    # an existing image is replaced, atomically
    (tmp_path / "old.ext4").write_bytes(b"old")
    assert build(plan, locate, tmp_path / "old.ext4").output_size > 3


def test_progress_reports_package_and_check_phases(tmp_path: Path) -> None:
    from worker.progress import Phase, ProgressEvent

    plan, locate = make_plan(tmp_path, [[file(f"f{i}", os.urandom(1 << 20)) for i in range(8)]])
    events: list[ProgressEvent] = []
    build(plan, locate, tmp_path / "p.ext4", progress=events.append)
    phases = [e.phase for e in events]
    assert Phase.PACKAGE in phases and Phase.CHECK in phases
    assert phases.index(Phase.CHECK) > phases.index(Phase.PACKAGE)
    last = [e for e in events if e.phase == Phase.PACKAGE][-1]
    assert last.bytes_done == last.bytes_total == plan.data_bytes > 0


def test_stream_reads_utf8_names_from_any_pax_writer(tmp_path: Path) -> None:
    # A PAX tar from Python's tarfile marks names UTF-8 (no hdrcharset=BINARY): mke2fs's
    # libarchive must run under a UTF-8 locale to take them.
    import io
    import tarfile

    plan, locate = make_plan(tmp_path, [[file("café-ünï", "x")]])

    def plain_pax(f: Any) -> None:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo("café-ünï")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))

    out = tmp_path / "u.ext4"
    build(plan, locate, out, write_tar_fn=plain_pax)
    assert "caf\\xc3\\xa9-\\xc3\\xbcn\\xc3\\xaf" in debugfs(out, "ls /")


@pytest.mark.parametrize("method", ["stream", "dir"])
def test_running_out_of_space_mid_build_is_a_clear_error(tmp_path: Path, method: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: a geometry far too small for the content, as a sizing bug would give.
    import worker.package.ext4 as ext4

    monkeypatch.setattr(ext4, "_choose_geometry", lambda *a, **k: (8 << 20, 2048))
    plan, locate = make_plan(tmp_path, [[file(f"f{i}", os.urandom(1 << 20)) for i in range(20)]])
    with pytest.raises(PackagingError, match=r"\(8M\) is too small .* mke2fs said"):
        build(plan, locate, tmp_path / "full.ext4", method=method)
    _no_partial(tmp_path, "full.ext4")
