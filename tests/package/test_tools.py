"""The e2fsprogs wrappers, loop handling, sizing arithmetic and the sidecar, each on its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.package.conftest import leftovers, needs_loop
from tests.package.helpers import make_plan
from tests.support.imagebuilder import TarEntry, directory, file, hardlink, symlink
from worker.errors import ConfigError, PackagingError
from worker.package import e2fs, sizing
from worker.package.features import PROFILES, mke2fs_option, resolve_features
from worker.package.loop import attached_devices, loop_mounted
from worker.package.sidecar import sidecar_path, write_sidecar


def _empty_image(path: Path, size: str = "32M") -> Path:
    e2fs.run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", str(path), size])
    return path


def test_tar_stream_support_is_detected_here() -> None:
    assert e2fs.e2fsprogs_version() >= (1, 47, 1)
    assert e2fs.tar_stream_support() == (True, "")


def test_fsck_check_reports_e2fsck_output(tmp_path: Path) -> None:
    image = _empty_image(tmp_path / "bad.ext4")
    e2fs.fsck_check(image)   # clean
    e2fs.debugfs_script(image, ["sif /lost+found links_count 7"], write=True)
    with pytest.raises(PackagingError, match="e2fsck -fn found problems") as err:
        e2fs.fsck_check(image)
    assert "ref count is 7, should be 2" in str(err.value)


def test_debugfs_script_failures_are_errors(tmp_path: Path) -> None:
    image = _empty_image(tmp_path / "img.ext4")
    with pytest.raises(PackagingError, match="debugfs failed"):
        e2fs.debugfs_script(image, [f"sif {e2fs.debugfs_quote('/no such')} mode 0100644"],
                            write=True)


def test_debugfs_quote_survives_quotes_and_spaces(tmp_path: Path) -> None:
    image = _empty_image(tmp_path / "img.ext4")
    name = '/a "quoted"  name'
    e2fs.debugfs_script(image, [f"mkdir {e2fs.debugfs_quote(name)}"], write=True)
    out = subprocess.run(["debugfs", "-R", "ls -p /", str(image)], capture_output=True,
                         text=True, check=True).stdout
    assert '/a "quoted"  name/' in out


def test_tools_run_with_fixed_clock_and_own_config() -> None:
    env = e2fs.tool_env()
    assert env["E2FSPROGS_FAKE_TIME"] == env["E2FSCK_TIME"] == str(e2fs.FIXED_TIME)
    assert "SOURCE_DATE_EPOCH" not in env
    assert Path(env["MKE2FS_CONFIG"]).read_text() == e2fs.MKE2FS_CONF


def test_feature_profiles() -> None:
    assert "orphan_file" in PROFILES["default"] and "orphan_file" not in PROFILES["compat"]
    assert resolve_features("compat") == PROFILES["compat"]
    assert resolve_features("extent, has_journal,^has_journal,dir_index") == ("extent",
                                                                              "dir_index")
    assert mke2fs_option(("extent",)) == "none,extent"
    for bad in ("", " , ", "extent,has journal", "-O"):
        with pytest.raises(ConfigError):
            resolve_features(bad)


@needs_loop
def test_loop_mount_failure_still_detaches(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (4 << 20))     # not a filesystem: mount fails
    (tmp_path / "mnt").mkdir()
    with pytest.raises(PackagingError, match="mounting"), \
            loop_mounted(junk, tmp_path / "mnt"):
        pass
    assert attached_devices(junk) == [] and leftovers(str(junk)) == []


@needs_loop
def test_loop_mount_is_nosuid_nodev_noexec_and_cleaned_up(tmp_path: Path) -> None:
    image = _empty_image(tmp_path / "img.ext4")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mounted(image, mnt):
        options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(mnt)],
                                 capture_output=True, text=True, check=True).stdout
        assert {"nosuid", "nodev", "noexec"} <= set(options.strip().split(","))
        assert len(attached_devices(image)) == 1
        assert len(leftovers(str(tmp_path))) == 2     # the check used elsewhere can see both
    assert not os.path.ismount(mnt) and attached_devices(image) == []
    assert leftovers(str(tmp_path)) == []


def test_content_needs_counts_what_ext4_stores(tmp_path: Path) -> None:
    plan, _ = make_plan(tmp_path, [[
        directory("d"),
        file("d/a", b"x" * 5000),                       # 2 blocks
        hardlink("d/b", "d/a"),                         # no inode, no blocks
        file("d/empty"),                                # inode, no blocks
        symlink("d/short", "target"),                   # fast symlink
        symlink("d/long", "/" + "t" * 80),              # one block
        file("d/x", b"y", xattrs={"user.big": b"v" * 300}),   # 1 block + an xattr block
        TarEntry("d/null", "char", devmajor=1, devminor=3),
    ]])
    needs = sizing.content_needs(plan)
    assert needs.data_blocks == 3
    assert needs.symlink_blocks == 1
    assert needs.xattr_blocks == 1
    # root + reserved (12) + d, a, empty, short, long, x, null
    assert needs.inodes == sizing.RESERVED_INODES + 7
    assert needs.dir_blocks >= 2 + 4    # root, d, lost+found


def test_sparse_files_count_only_their_data(tmp_path: Path) -> None:
    blocks, extents = sizing._data_blocks(10 << 30, ((0, 10), (5 << 30, 8192), (5 << 30, 10)))
    assert blocks == 3 and extents == 3
    blocks, extents = sizing._data_blocks(1 << 40, ((0, 1 << 30),))
    assert blocks == (1 << 30) // 4096 and extents == blocks // sizing.EXTENT_BLOCKS


def test_headroom_and_inode_margin() -> None:
    needs = sizing.ContentNeeds(data_blocks=25_600, dir_blocks=0, symlink_blocks=0,
                                extent_blocks=0, xattr_blocks=0, inodes=100_000)
    assert sizing.headroom_bytes(needs, 0.10, 64 << 20) == 64 << 20
    assert sizing.headroom_bytes(needs, 1.0, 0) == needs.bytes
    assert sizing.inode_count(needs, 0) == 125_000
    assert sizing.align_up(1, 2 << 20) == 2 << 20 and sizing.align_up(2 << 20, 2 << 20) == 2 << 20


def test_sidecar_is_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "root.ext4"
    path = write_sidecar(out, {"sha256": "ab", "config": {"Cmd": ["/bin/sh"]}})
    assert path == sidecar_path(out) == tmp_path / "root.ext4.json"
    assert json.loads(path.read_text())["config"]["Cmd"] == ["/bin/sh"]
    assert [p.name for p in tmp_path.iterdir()] == ["root.ext4.json"]
    with pytest.raises(TypeError):
        write_sidecar(out, {"bad": object()})
    assert json.loads(path.read_text())["sha256"] == "ab"      # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["root.ext4.json"]


def test_time_split_and_ext4_extra_encoding() -> None:
    from worker.cache.index import EntryKind, IndexEntry
    from worker.package.ext4 import _split_time, _subsecond_commands

    assert _split_time(1_650_000_000.25) == (1_650_000_000, 250_000_000)
    assert _split_time(-1.5) == (-2, 500_000_000)
    assert _split_time(float("nan")) == (0, 0)
    # ext4's range: a signed 32-bit field plus two epoch bits, clamped as the kernel does
    assert _split_time(1e30) == (2**31 - 1 + 3 * 2**32, 0)
    assert _split_time(float("-inf")) == (-(2**31), 0)
    assert _subsecond_commands("/f", IndexEntry("f", EntryKind.FILE, mtime=5.0)) == []
    # one conversion for every writer: the dir writer's nanoseconds and the tar's PAX mtime
    from worker.flatten.times import pax_time, split_time, to_ns
    assert split_time(1_650_000_000.123456789) == (1_650_000_000, 123_456_717)
    assert to_ns(1_650_000_000.123456789) == 1_650_000_000_123_456_717
    assert to_ns(-1.5) == -1_500_000_000 and to_ns(float("nan")) == 0
    assert to_ns(1e30) < 1 << 63 and to_ns(float("-inf")) > -(1 << 63)
    assert pax_time(1_650_000_000.123456789) == "1650000000.123456717"
    assert pax_time(-1.5) == "-1.5" and pax_time(-0.25) == "-0.25" and pax_time(7.0) == "7"
    # beyond 2038 the two low bits of the extra field extend the 32-bit seconds
    late = IndexEntry("f", EntryKind.FILE, mtime=float(2**31 + 5) + 0.5)
    assert _subsecond_commands("/f", late) == [
        f'sif "/f" mtime @{(2**31 + 5) & 0xFFFFFFFF}',
        f'sif "/f" mtime_extra {(500_000_000 << 2) | 1}']
    # before 1970 with a fraction: mke2fs truncates towards zero, so the seconds are set too
    early = IndexEntry("f", EntryKind.FILE, mtime=-1.5)
    assert _subsecond_commands("/f", early) == [
        f'sif "/f" mtime @{-2 & 0xFFFFFFFF}', f'sif "/f" mtime_extra {500_000_000 << 2}']
