"""Every layer-application rule, from real tar layers in real images in the test registry.

Each case is exported with ``rootfs-export export --format dir`` and ``--format tar``; the two
results must be identical (see support.export_both), GNU tar must extract the tar to the same
tree and ``mke2fs -d -`` must turn it into a filesystem e2fsck finds clean.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.flatten.support import export_both
from tests.support.imagebuilder import (
    Layer,
    TarEntry,
    directory,
    file,
    hardlink,
    opaque,
    sparse_tar,
    symlink,
    whiteout,
)

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")

root_only = pytest.mark.needs_root(reason="needs root (ownership, devices, "
                               "security.* xattrs in the dir output)")


@pytest.fixture
def both(registry: Any, tmp_path: Path, capsys: Any) -> Any:
    def run(name: str, *layers: Layer, consumers: bool = True) -> Any:
        return export_both(registry, tmp_path, capsys, name, list(layers), consumers=consumers)
    return run


def L(*entries: TarEntry, fmt: str = "pax", compression: str = "gzip") -> Layer:  # noqa: N802
    return Layer.from_entries(list(entries), compression=compression, format=fmt)


def test_whiteout_file_symlink_and_tree(both: Any) -> None:
    ex = both("whiteouts",
              L(file("etc/gone", "x"), symlink("etc/link", "gone"), directory("opt/tree"),
                file("opt/tree/a/b/c", "deep"), file("opt/keep", "k")),
              L(whiteout("etc/gone"), whiteout("etc/link"), whiteout("opt/tree"),
                whiteout("never/existed")))
    assert set(ex.listing) == {".", "etc", "opt", "opt/keep"}
    assert not any(".wh." in p for p in ex.listing)


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_keeps_same_layer_entries(both: Any, marker_first: bool) -> None:
    new = [directory("app"), file("app/before", "b")]
    after = [file("app/after", "a"), directory("app/sub"), file("app/sub/x", "x")]
    layer2 = [*new, opaque("app"), *after] if marker_first else [opaque("app"), *new, *after]
    ex = both(f"opaque-{marker_first}",
              L(directory("app"), file("app/old", "o"), file("app/sub/olddeep", "o")),
              L(*layer2))
    assert {p for p in ex.listing if p.startswith("app/")} == {
        "app/before", "app/after", "app/sub", "app/sub/x"}


def test_dir_replaced_by_file_and_file_by_dir(both: Any) -> None:
    ex = both("typechange",
              L(directory("d"), file("d/child", "c"), file("f", "file"),
                symlink("s", "d")),
              L(file("d", "now a file"), directory("f"), file("f/inside", "i"),
                directory("s"), file("s/real", "r")))
    assert stat.S_ISREG(ex.kind("d")) and ex.content("d") == b"now a file"
    assert "d/child" not in ex.listing
    assert stat.S_ISDIR(ex.kind("f")) and ex.content("f/inside") == b"i"
    assert stat.S_ISDIR(ex.kind("s")) and "s/real" in ex.listing and "d/real" not in ex.listing


def test_hardlink_into_lower_layer(both: Any) -> None:
    ex = both("hardlink-lower",
              L(file("usr/bin/python3.11", "PY" * 100, mode=0o755)),
              L(hardlink("usr/bin/python3", "usr/bin/python3.11")))
    assert ex.groups == {frozenset({"usr/bin/python3", "usr/bin/python3.11"})}
    assert ex.content("usr/bin/python3") == b"PY" * 100


def test_hardlink_keeps_old_content_when_target_replaced_or_deleted(both: Any) -> None:
    ex = both("hardlink-replaced",
              L(file("a", "old content"), hardlink("l1", "a"), hardlink("l2", "a"),
                file("b", "b old"), hardlink("bl", "b")),
              L(file("a", "new content"), whiteout("b")))
    assert ex.content("a") == b"new content"
    assert ex.content("l1") == ex.content("l2") == b"old content"
    assert ex.content("bl") == b"b old" and "b" not in ex.listing
    assert ex.groups == {frozenset({"l1", "l2"})}


def test_hardlink_to_missing_target_fails_naming_both(registry: Any, tmp_path: Path) -> None:
    from tests.flatten.support import run_export
    from tests.support.imagebuilder import push_image

    img = push_image(registry, "flatten/badlink", "v1",
                     [L(file("x", "x")), L(hardlink("dir/link", "nowhere/target"))])
    rc, out, err = run_export(img.reference, tmp_path / "o", "dir", tmp_path / "cache")
    assert rc != 0
    assert "nowhere/target" in err and "dir/link" in err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("how", ["absolute", "relative", "chained", "same-layer", "dotdot"])
def test_symlinked_parent_cannot_escape(both: Any, tmp_path: Path, how: str) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    abs_target = str(sentinel)
    rel_target = "../" * 30 + abs_target.lstrip("/")
    if how == "absolute":
        layers = [L(symlink("evil", abs_target)), L(file("evil/pwned", "x"))]
    elif how == "relative":
        layers = [L(directory("a/b"), symlink("a/b/evil", rel_target)),
                  L(file("a/b/evil/pwned", "x"))]
    elif how == "chained":
        layers = [L(symlink("c1", "c2"), symlink("c2", "sub/c3")),
                  L(directory("sub"), symlink("sub/c3", "../../../" + abs_target)),
                  L(file("c1/pwned", "x"))]
    elif how == "same-layer":
        layers = [L(symlink("evil", abs_target), file("evil/pwned", "x"))]
    else:
        layers = [L(symlink("up", "..")), L(file("up/up/up/pwned", "x"))]
    ex = both(f"escape-{how}", *layers)
    assert list(sentinel.iterdir()) == []
    inside = {"absolute": abs_target, "relative": abs_target, "chained": abs_target,
              "same-layer": abs_target, "dotdot": ""}[how].lstrip("/")
    expect = (inside + "/pwned") if inside else "pwned"
    assert expect in ex.listing and ex.content(expect) == b"x"
    assert all(not p.startswith("..") for p in ex.listing)


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/../../etc/escape"])
def test_dotdot_names_climbing_out_are_rejected(registry: Any, tmp_path: Path,
                                                name: str) -> None:
    from tests.flatten.support import run_export
    from tests.support.imagebuilder import push_image

    img = push_image(registry, "flatten/dotdot", None, [L(file("ok", "1"), file(name, "x"))])
    for fmt in ("dir", "tar"):
        out = tmp_path / f"o.{fmt}"
        rc, _, err = run_export(img.reference, out, fmt, tmp_path / "cache")
        assert rc != 0 and "escape" in err, err
        assert not out.exists()
    assert not (tmp_path.parent / "escape").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_dotdot_names_inside_the_root_are_normalised(both: Any) -> None:
    ex = both("dotdot-inside", L(file("a/b/../c", "c"), file("./d/./e", "e")))
    assert ex.content("a/c") == b"c" and ex.content("d/e") == b"e"


@root_only
def test_special_modes(both: Any) -> None:
    ex = both("modes",
              L(file("usr/bin/su", "su", mode=0o4755), file("usr/bin/wall", "w", mode=0o2755),
                directory("tmp", mode=0o1777), directory("srv/group", mode=0o2775, gid=50),
                file("srv/group/f", "f", gid=50), file("secret", "s", mode=0o000)))
    assert ex.listing["usr/bin/su"][1] == 0o4755
    assert ex.listing["usr/bin/wall"][1] == 0o2755
    assert ex.listing["tmp"][1] == 0o1777
    assert ex.listing["srv/group"][1] == 0o2775 and ex.listing["srv/group"][3] == 50
    assert ex.listing["secret"][1] == 0


@root_only
@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_big_uid_gid(both: Any, fmt: str) -> None:
    ex = both(f"ids-{fmt}",
              L(file("a", "a", uid=70000, gid=65536), file("b", "b", uid=3_000_000,
                                                           gid=(1 << 21) + 5),
                directory("d", uid=4_000_000_000, gid=70001), fmt=fmt))
    assert ex.listing["a"][2:4] == (70000, 65536)
    assert ex.listing["b"][2:4] == (3_000_000, (1 << 21) + 5)
    assert ex.listing["d"][2:4] == (4_000_000_000, 70001)


@root_only
def test_xattrs_and_file_capabilities(both: Any) -> None:
    ex = both("xattrs",
              L(file("usr/bin/ping", "ping", mode=0o755,
                     xattrs={"security.capability": CAP_NET_RAW}),
                file("data", "d", xattrs={"user.comment": b"hello\x00\nworld",
                                          "trusted.x": b"\xff\xfe"}),
                directory("dir", xattrs={"user.dir": b"1"})),
              L(file("later", "l", xattrs={"user.binary": bytes(range(256))})))
    assert dict(ex.listing["usr/bin/ping"][8]) == {"security.capability": CAP_NET_RAW}
    assert dict(ex.listing["data"][8]) == {"user.comment": b"hello\x00\nworld",
                                           "trusted.x": b"\xff\xfe"}
    assert dict(ex.listing["dir"][8]) == {"user.dir": b"1"}
    assert dict(ex.listing["later"][8]) == {"user.binary": bytes(range(256))}


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_long_names_and_link_names(both: Any, fmt: str) -> None:
    deep = "/".join(["d" * 60] * 5)
    longname = deep + "/" + "f" * 200
    ex = both(f"long-{fmt}",
              L(file(longname, "long"), symlink("s" * 150, "/" + longname),
                hardlink("h" * 120, longname), fmt=fmt),
              L(file(deep + "/" + "g" * 250, "g"), compression="zstd"))
    assert ex.content(longname) == b"long"
    assert ex.listing["s" * 150][6] == "/" + longname
    assert frozenset({longname, "h" * 120}) in ex.groups


def test_utf8_names_and_link_targets(both: Any) -> None:
    ex = both("utf8",
              L(file("etc/ssl/certs/NetLock_Arany_=Class_Gold=_Főtanúsítvány.pem", "pem"),
                symlink("etc/ssl/certs/8f9a.0", "NetLock_Arany_=Class_Gold=_Főtanúsítvány.pem"),
                symlink("etc/ssl/certs/ünïcödé", "plain"), directory("srv/日本語"),
                file("srv/日本語/" + "長" * 60, "long utf-8 name")))
    assert ex.content("etc/ssl/certs/8f9a.0") == b"pem"
    assert ex.listing["etc/ssl/certs/ünïcödé"][6] == "plain"
    assert ex.content("srv/日本語/" + "長" * 60) == b"long utf-8 name"


def test_non_utf8_names(both: Any) -> None:
    raw = b"caf\xe9/na\xefve-\xff.txt"
    ex = both("nonutf8",
              L(TarEntry("x", "file", b"latin1", name_bytes=raw),
                TarEntry("x", "symlink", linkname="\udce9t\udce9", name_bytes=b"lnk\xe9")),
              L(TarEntry("x", "file", b"", name_bytes=b"caf\xe9/.wh.na\xefve-\xff.txt")))
    names = {os.fsencode(p) for p in ex.listing}
    assert b"caf\xe9" in names and raw not in names and b"lnk\xe9" in names
    assert os.fsencode(ex.listing["lnk\udce9"][6]) == b"\xe9t\xe9"


@root_only
def test_devices_and_fifos(both: Any) -> None:
    ex = both("devices",
              L(TarEntry("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
                TarEntry("dev/sda", "block", devmajor=8, devminor=0, mode=0o660, gid=6),
                TarEntry("run/initctl", "fifo", mode=0o600),
                TarEntry("dev/big", "char", devmajor=4095, devminor=1048575)))
    assert stat.S_ISCHR(ex.kind("dev/null")) and ex.listing["dev/null"][9] == (1, 3)
    assert stat.S_ISBLK(ex.kind("dev/sda")) and ex.listing["dev/sda"][9] == (8, 0)
    assert stat.S_ISFIFO(ex.kind("run/initctl"))
    assert ex.listing["dev/big"][9] == (4095, 1048575)


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_sparse_file(both: Any, fmt: str) -> None:
    size = 512 << 20
    chunks = [(0, b"head"), (100 << 20, b"middle" * 1000), (size - 5, b"tail!")]
    ex = both(f"sparse-{fmt}", Layer(sparse_tar("var/log/lastlog", size, chunks, format=fmt)))
    st = os.stat(ex.dir / "var/log/lastlog")
    assert st.st_size == size and st.st_blocks * 512 < 1 << 20   # holes stayed holes
    with open(ex.dir / "var/log/lastlog", "rb") as f:
        for off, data in chunks:
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(50 << 20)
        assert f.read(4096) == bytes(4096)
    assert ex.tar.stat().st_size < 1 << 20


def test_duplicate_entries_last_wins(both: Any) -> None:
    ex = both("duplicates",
              L(file("x", "first"), file("y", "y"), file("x", "second"),
                directory("d", mode=0o700), file("d/in", "i"), directory("d", mode=0o750),
                symlink("s", "x"), file("s", "file now")))
    assert ex.content("x") == b"second"
    assert ex.listing["d"][1] == 0o750 and "d/in" in ex.listing
    assert stat.S_ISREG(ex.kind("s"))


def test_read_only_directory_with_children(both: Any) -> None:
    ex = both("readonly",
              L(directory("ro", mode=0o555), file("ro/a", "a", mode=0o444),
                directory("ro/sub", mode=0o500), file("ro/sub/b", "b"),
                directory("none", mode=0o000), file("none/c", "c")),
              L(file("ro/later", "later")))
    assert ex.listing["ro"][1] == 0o555 and ex.listing["none"][1] == 0
    assert {"ro/a", "ro/sub/b", "ro/later", "none/c"} <= set(ex.listing)


def test_directory_mtimes_survive_children(both: Any) -> None:
    ex = both("mtimes", L(directory("d", mtime=1_000_000_000), file("d/f", "f", mtime=1_600_000_000),
                          directory("d/e", mtime=1_100_000_000)),
              L(file("d/e/late", "l", mtime=1_700_000_000)))
    assert ex.listing["d"][4] == 1_000_000_000 * 10**9
    assert ex.listing["d/e"][4] == 1_100_000_000 * 10**9
    assert ex.listing["d/f"][4] == 1_600_000_000 * 10**9


def test_many_layers_mixed_compression(both: Any) -> None:
    layers = [L(file(f"l{i}/f", f"layer {i}"), file("shared", f"v{i}"),
                compression=("gzip", "zstd", "none")[i % 3]) for i in range(7)]
    ex = both("mixed", *layers)
    assert ex.content("shared") == b"v6"
    assert all(ex.content(f"l{i}/f") == f"layer {i}".encode() for i in range(7))


def test_plain_tar_layer_made_by_gnu_tar(both: Any, tmp_path: Path) -> None:
    # A layer written by GNU tar itself (./ prefixes, directories first): raw passthrough.
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("box\n")
    import subprocess
    tar = subprocess.run(["tar", "-c", "-f", "-", "--numeric-owner", "--owner=0", "--group=0",
                          "--format=posix", "--pax-option=delete=atime,delete=ctime",
                          "-C", str(src), "."], check=True, capture_output=True).stdout
    ex = both("gnutar", Layer(tar, "gzip"), L(file("etc/motd", "hi")))
    assert ex.content("etc/hostname") == b"box\n"
    assert ex.result_tar["extra"]["passthrough_headers"] >= 1


@pytest.mark.needs_root(reason="switching to an unprivileged user needs root")
def test_unprivileged_gnu_tar_fills_read_only_dirs(both: Any,
                                                   request: pytest.FixtureRequest) -> None:
    import shutil
    import subprocess
    import tempfile

    ex = both("readonly-nobody",
              L(directory("ro", mode=0o555, mtime=1_000_000_000), file("ro/a", "a"),
                directory("ro/deeper", mode=0o500), file("ro/deeper/b", "b")),
              L(file("ro/late", "late")))
    work = Path(tempfile.mkdtemp(prefix="rootfs-export-gnutar-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    os.chown(work, 65534, 65534)
    shutil.copy(ex.tar, work / "t.tar")
    os.chmod(work / "t.tar", 0o644)
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "tar", "-xf", str(work / "t.tar"), "-C", str(work)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (work / "ro/late").read_text() == "late"
    assert (work / "ro/deeper/b").read_text() == "b"
    assert stat.S_IMODE(os.stat(work / "ro").st_mode) == 0o555
    assert os.stat(work / "ro").st_mtime == 1_000_000_000


def test_hardlink_header_metadata_never_overrides_the_inode(both: Any, tmp_path: Path) -> None:
    import subprocess

    ex = both("hardlink-meta",
              L(file("bin/tool", "T", mode=0o755, mtime=1_500_000_000)),
              L(hardlink("bin/alias", "bin/tool", mode=0o600, mtime=1_700_000_000)))
    assert ex.listing["bin/alias"][1] == ex.listing["bin/tool"][1] == 0o755
    img = tmp_path / "x.ext4"
    subprocess.run(f"mke2fs -q -F -t ext4 -d - {img} 16M < {ex.tar}", shell=True, check=True)
    p = subprocess.run(["debugfs", "-R", "stat /bin/alias", str(img)], capture_output=True,
                       text=True)
    assert "Mode:  0755" in p.stdout and "Links: 2" in p.stdout, p.stdout


def test_hardlink_header_carries_the_inode_owners_metadata(both: Any) -> None:
    import tarfile

    ex = both("hardlink-owner-meta",
              L(file("bin/tool", "T", mode=0o4750, uid=1001, gid=1002, mtime=1_500_000_000.5,
                     xattrs={"user.origin": b"owner", "security.capability": CAP_NET_RAW})),
              L(hardlink("bin/alias", "bin/tool", mode=0o600, uid=7, gid=8,
                         mtime=1_700_000_000, xattrs={"user.origin": b"link"})))
    with tarfile.open(ex.tar, "r:", encoding="utf-8", errors="surrogateescape") as tf:
        members = {m.name.removeprefix("./"): m for m in tf}
    owner, link = members["bin/tool"], members["bin/alias"]
    assert link.type == tarfile.LNKTYPE
    assert (link.mode, link.uid, link.gid, link.mtime) == (0o4750, 1001, 1002, 1_500_000_000.5)
    assert (link.mode, link.uid, link.gid, link.mtime) == \
        (owner.mode, owner.uid, owner.gid, owner.mtime)
    xattrs = {k: v for k, v in link.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert xattrs == {k: v for k, v in owner.pax_headers.items()
                      if k.startswith("SCHILY.xattr.")}
    assert xattrs["SCHILY.xattr.user.origin"] == "owner"
    assert "SCHILY.xattr.security.capability" in xattrs


def test_sub_second_mtimes_agree_to_the_nanosecond(both: Any) -> None:
    # A float mtime near 1.65e9 s has ~240 ns of resolution; every output gives it the
    # nanoseconds of its exact value (floor of the seconds plus the rounded fraction):
    # 1_650_000_000.123456789 is stored as 1650000000.12345671653747558..., so ...717 ns.
    # ``round(mtime * 1e9)`` would say ...768.
    ex = both("sub-second",
              L(directory("d", mtime=1_650_000_000.25),
                file("d/ns", "ns", mtime=1_650_000_000.123456789),
                symlink("d/link", "ns", mtime=1_650_000_000.5),
                file("d/old", "o", mtime=-1.5)))
    assert ex.listing["d/ns"][4] == 1_650_000_000_123_456_717
    assert ex.listing["d"][4] == 1_650_000_000_250_000_000
    assert ex.listing["d/link"][4] == 1_650_000_000_500_000_000
    assert ex.listing["d/old"][4] == -1_500_000_000
