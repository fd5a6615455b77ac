"""Hostile names against the ext4 methods: nothing in an image may reach a debugfs script as a
command, and every format refuses what the kernel cannot hold, naming layer and path."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.flatten.support import run_export
from tests.package.conftest import LOOP_SKIP
from tests.package.helpers import debugfs, fsck
from tests.support.imagebuilder import Layer, TarEntry, file, hardlink, push_image, symlink
from tests.support.root import require_root
from worker.package.e2fs import DebugfsUnsafe, debugfs_quote, debugfs_refusal

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534




def _injection(sentinel: Path) -> str:
    """A name that, written unchecked into a debugfs script, makes it dump /payload to the
    host path ``sentinel``."""
    return f"\ndump /payload {sentinel}\n"


def _cli(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "rootfs-export"), *args]


def test_debugfs_quote_takes_quotes_and_blanks_but_no_control_characters(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ('a"b', "c d", "e'f", "g\\h", 'x""y'):
        (src / name).write_text(name)
    image = tmp_path / "img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(image), "8M"],
                   check=True)
    for name in ('a"b', "c d", "e'f", "g\\h", 'x""y'):
        out = subprocess.run(["debugfs", "-R", f"cat {debugfs_quote('/' + name)}", str(image)],
                             capture_output=True, text=True, check=True).stdout
        assert out == name
    for bad in ("a\nb", "a\rb", "a\tb", "a\x1bb", "a\x7fb", "x" * 4000):
        assert debugfs_refusal(bad) is not None
        with pytest.raises(DebugfsUnsafe):
            debugfs_quote(bad)


@pytest.mark.parametrize("fmt,extra", [("tar", ()), ("dir", ()),
                                       ("ext4", ("--ext4-method", "stream")),
                                       ("ext4", ("--ext4-method", "dir"))])
def test_xattr_name_injection_is_refused_by_the_planner(registry: Any, shared_tmp: Path,
                                                        fmt: str, extra: tuple[str, ...]) -> None:
    sentinel = shared_tmp / "pwned"
    name = "user.a" + _injection(sentinel)
    image = push_image(registry, "hostile/xattr-name", "v1", [Layer.from_entries([
        file("payload", "PWNED\n"), file("f", "x", xattrs={name: b"v"})])])
    out = shared_tmp / ("rootfs" if fmt == "dir" else "out")
    rc, _, err = run_export(image.reference, out, fmt, shared_tmp / "cache", *extra)
    assert rc != 0
    assert not sentinel.exists()
    assert image.layer_digests[0] in err and "'f'" in err and "user.a\\ndump" in err
    assert "control character" in err
    assert not out.exists()


@pytest.mark.parametrize("xattrs,why", [
    ({"a": b"v"}, "not in a known namespace"),
    ({"user." + "n" * 251: b"v"}, "256 bytes long"),
    ({"user.big": b"v" * 65537}, "65537-byte value"),
])
@pytest.mark.parametrize("fmt", ["tar", "dir", "ext4"])
def test_xattrs_the_kernel_cannot_hold_are_refused(registry: Any, tmp_path: Path, fmt: str,
                                                   xattrs: dict[str, bytes], why: str) -> None:
    image = push_image(registry, "hostile/xattr-limits", "v1", [Layer.from_entries([
        file("f", "x", xattrs=xattrs)])])
    out = tmp_path / "out"
    rc, _, err = run_export(image.reference, out, fmt, tmp_path / "cache")
    assert rc != 0
    assert why in err and image.layer_digests[0] in err and "'f'" in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["link", "owner"])
def test_newline_names_of_hardlinked_symlinks_never_reach_debugfs_as_root(
        registry: Any, shared_tmp: Path, where: str) -> None:
    require_root("the dir method relinks hardlinked symlinks with debugfs as root only")
    sentinel = shared_tmp / f"pwned-{where}"
    owner = "s" + (_injection(sentinel) if where == "owner" else "")
    link = "l" + (_injection(sentinel) if where == "link" else "")
    image = push_image(registry, f"hostile/symhl-{where}", "v1", [Layer.from_entries([
        file("payload", "PWNED\n"), symlink(owner, "payload"), hardlink(link, owner)])])
    out = shared_tmp / "root.ext4"
    rc, _, err = run_export(image.reference, out, "ext4", shared_tmp / "cache",
                            "--ext4-method", "dir")
    assert not sentinel.exists()
    assert rc != 0
    assert "cannot be made with debugfs" in err and "--ext4-method mount" in err
    assert not out.exists()
    if LOOP_SKIP is None:
        # auto as root takes the direct method, which is exact
        rc, _, err = run_export(image.reference, out, "ext4", shared_tmp / "cache")
        assert rc == 0, err
        assert not sentinel.exists()
        assert fsck(out).returncode == 0
        listing = debugfs(out, "ls -l /")
        assert "payload" in listing


@pytest.mark.parametrize("where", ["link", "owner"])
def test_newline_names_of_hardlinks_never_reach_debugfs_as_non_root(
        registry: Any, shared_tmp: Path, where: str) -> None:
    require_root("switch to an unprivileged user")
    sentinel = shared_tmp / f"pwned-{where}"
    owner = "dev/null" + (_injection(sentinel) if where == "owner" else "")
    link = "dev/zero" + (_injection(sentinel) if where == "link" else "")
    # a device node and its hardlink: as non-root both are made with debugfs (mknod, ln)
    image = push_image(registry, f"hostile/devhl-{where}", "v1", [Layer.from_entries([
        file("payload", "PWNED\n"), symlink("s", "payload"), hardlink("h", "s"),
        TarEntry(owner, "char", mode=0o666, devmajor=1, devminor=3),
        hardlink(link, owner)])])
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
           "PYTHONPATH": str(ROOT)}
    out = work / "root.ext4"
    for method in ("auto", "dir"):
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             *_cli("export", image.reference, "-o", str(out), "--cache-dir", str(work / "cache"),
                   "--ext4-method", method)],
            env=env, capture_output=True, text=True, timeout=300, check=False)
        assert not sentinel.exists(), proc.stderr
        assert proc.returncode == 0, proc.stderr
        assert fsck(out).returncode == 0
        if method == "dir":   # what debugfs cannot name is lost and said so
            assert "cannot keep" in proc.stderr and "debugfs cannot" in proc.stderr
        listing = debugfs(out, "ls -l /")
        assert "payload" in listing
        out.unlink()


@pytest.mark.parametrize("fmt", ["tar", "dir", "ext4"])
@pytest.mark.parametrize("entry,why", [
    (file("d/" + "n" * 256, "x"), "a path component of 256 bytes"),
    (symlink("s", "t" * 4096), "symlink target of 4096 bytes"),
])
def test_names_the_kernel_cannot_hold_are_refused(registry: Any, tmp_path: Path, fmt: str,
                                                  entry: TarEntry, why: str) -> None:
    image = push_image(registry, "hostile/long-names", "v1", [Layer.from_entries([
        file("ok", "x"), entry])])
    out = tmp_path / "out"
    rc, _, err = run_export(image.reference, out, fmt, tmp_path / "cache")
    assert rc == 1, err
    assert why in err and image.layer_digests[0] in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture
def tiny_image(registry: Any) -> Any:
    return push_image(registry, "hostile/tiny", "v1", [Layer.from_entries([file("a", "b")])])


def _refused(image: Any, out: Path | str, fmt: str, cache: Path, *extra: str) -> str:
    rc, _, err = run_export(image.reference, Path(out), fmt, cache, *extra)
    assert rc != 0, err
    assert "Traceback" not in err
    assert "rootfs-export: download" not in err, "refused only after downloading"
    return err


@pytest.mark.parametrize("fmt", ["tar", "ext4", "dir"])
def test_a_device_node_output_is_refused_before_any_work(tiny_image: Any, tmp_path: Path,
                                                         fmt: str) -> None:
    require_root("only root can make (and could replace) a device node")
    # a private copy of /dev/null: a regression must not break the machine's own
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    err = _refused(tiny_image, null, fmt, tmp_path / "cache")
    assert f"refusing to write {null}" in err
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert not os.path.lexists(f"{null}.json")


@pytest.mark.parametrize("fmt", ["tar", "ext4", "dir"])
def test_a_symlink_at_the_output_or_sidecar_is_refused(tiny_image: Any, tmp_path: Path,
                                                       fmt: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.symlink_to(victim)
    err = _refused(tiny_image, out, fmt, tmp_path / "cache")
    assert str(out) in err and "symlink" in err
    out.unlink()
    Path(str(out) + ".json").symlink_to(victim)
    err = _refused(tiny_image, out, fmt, tmp_path / "cache")
    assert f"{out}.json" in err and "symlink" in err
    assert victim.read_text() == "keep" and not out.exists()


def test_existing_outputs_of_the_wrong_kind_are_refused(tiny_image: Any, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "not an empty directory" in _refused(tiny_image, full, "dir", tmp_path / "cache")
    assert (full / "x").read_text() == "x"
    assert "not an empty directory" in _refused(tiny_image, tmp_path / "full" / "x", "dir",
                                         tmp_path / "cache")
    for fmt in ("tar", "ext4"):
        assert "is a directory" in _refused(tiny_image, full, fmt, tmp_path / "cache")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in _refused(tiny_image, fifo, "tar", tmp_path / "cache")
    # what may be replaced still is: a regular file, an empty directory
    (tmp_path / "old.tar").write_text("old")
    rc, _, err = run_export(tiny_image.reference, tmp_path / "old.tar", "tar", tmp_path / "cache")
    assert rc == 0, err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_export(tiny_image.reference, tmp_path / "empty", "dir", tmp_path / "cache")
    assert rc == 0, err and (tmp_path / "empty" / "a").read_text() == "b"


def test_an_unwritable_output_directory_is_a_clear_error(tiny_image: Any, tmp_path: Path,
                                                          shared_tmp: Path) -> None:
    err = _refused(tiny_image, "/proc/self/x.ext4", "ext4", tmp_path / "cache")
    assert "cannot write /proc/self/x.ext4" in err
    if os.geteuid() != 0:
        return
    ro = shared_tmp / "ro"
    ro.mkdir(mode=0o555)
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
           "PYTHONPATH": str(ROOT)}
    for fmt in ("ext4", "tar"):
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             *_cli("export", tiny_image.reference, "-o", str(ro / "x.img"), "--format", fmt,
                   "--cache-dir", str(work / "cache"))],
            env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and f"cannot write {ro}/x.img" in proc.stderr
        assert "Permission denied" in proc.stderr


@pytest.mark.parametrize("squat", ["dir", "symlink"])
def test_a_squatted_private_directory_does_not_stop_an_export(tiny_image: Any,
                                                               shared_tmp: Path,
                                                               squat: str) -> None:
    require_root("play two users")
    tmp = shared_tmp / "tmp"
    tmp.mkdir(mode=0o1777)
    os.chmod(tmp, 0o1777)
    squatted = tmp / f"rootfs-export-{NOBODY}"   # made first by another user (root here)
    if squat == "dir":
        squatted.mkdir(mode=0o777)
        os.chmod(squatted, 0o777)
    else:
        squatted.symlink_to(shared_tmp)
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(tmp),
           "PYTHONPATH": str(ROOT)}
    out = work / "root.ext4"
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         *_cli("export", tiny_image.reference, "-o", str(out), "--cache-dir",
               str(work / "cache"))],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert fsck(out).returncode == 0
    if squat == "dir":
        assert not list(squatted.iterdir())   # nothing of ours went into their directory
    # the fallback directory went with the process
    assert sorted(p.name for p in tmp.iterdir()) == [squatted.name]


def _as_nobody(image: Any, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         *_cli("export", image.reference, "--cache-dir", str(work / "cache"), *args)],
        env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def owned_image(registry: Any) -> Any:
    return push_image(registry, "hostile/owned", "v1", [Layer.from_entries([
        file("owned", "x", uid=1234, gid=1234), file("mine", "y"),
        TarEntry("dev/null", "char", devmajor=1, devminor=3, mode=0o666)])])


def test_strict_refuses_a_lossy_non_root_dir_export(owned_image: Any,
                                                    shared_tmp: Path) -> None:
    require_root("switch to an unprivileged user")
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    proc = _as_nobody(owned_image, work, "-o", str(work / "root"), "--format", "dir",
                      "--strict")
    assert proc.returncode == 1, proc.stderr
    assert "--strict" in proc.stderr and "devices: 1" in proc.stderr
    assert "ownership: " in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["cache"]   # no partial output
    proc = _as_nobody(owned_image, work, "-o", str(work / "root"), "--format", "dir")
    assert proc.returncode == 0, proc.stderr
    assert "could not be preserved" in proc.stderr


def test_ext4_dir_method_as_non_root_does_not_warn_about_what_it_restores(
        owned_image: Any, shared_tmp: Path) -> None:
    require_root("switch to an unprivileged user")
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    out = work / "root.ext4"
    proc = _as_nobody(owned_image, work, "-o", str(out), "--ext4-method", "dir", "--json",
                      "--strict")
    assert proc.returncode == 0, proc.stderr
    assert "could not be preserved" not in proc.stderr
    assert "warning" not in proc.stderr.lower()
    doc = json.loads(proc.stdout)
    assert doc["warnings"] == []
    assert "Inode: " in debugfs(out, "stat /dev/null") and "User:  1234" in debugfs(
        out, "stat /owned")
