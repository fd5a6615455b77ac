"""A mount-method export killed outright (SIGKILL: no cleanup runs) leaves its image mounted
and attached; the next mount-method export finds that, cleans it up and says so."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.package.conftest import leftovers, needs_loop
from tests.support.imagebuilder import Layer, file, push_image
from worker.package import mountstate
from worker.package.loop import loop_mounted

BIG = 2 << 30      # zeros: a 2 MiB blob that takes seconds to apply


class ZerosLayer:
    """A gzip layer holding one large file of zeros, built streaming (never all in memory)."""

    compression = "gzip"

    def __init__(self, size: int) -> None:
        ti = tarfile.TarInfo("big.bin")
        ti.size, ti.mtime, ti.mode = size, 1_600_000_000, 0o644
        header = ti.tobuf(tarfile.PAX_FORMAT)
        tail = b"\0" * (-size % 512) + b"\0" * 1024
        raw = hashlib.sha256()
        gz = zlib.compressobj(1, zlib.DEFLATED, 31)
        out = [gz.compress(header)]
        raw.update(header)
        chunk = bytes(8 << 20)
        left = size
        while left:
            piece = chunk[:min(left, len(chunk))]
            raw.update(piece)
            out.append(gz.compress(piece))
            left -= len(piece)
        raw.update(tail)
        out += [gz.compress(tail), gz.flush()]
        self.blob = b"".join(out)
        self.size = len(self.blob)
        self.diff_id = "sha256:" + raw.hexdigest()
        self.digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()

    def media_type_for(self, schema: str) -> str:
        return ("application/vnd.oci.image.layer.v1.tar+gzip" if schema == "oci"
                else "application/vnd.docker.image.rootfs.diff.tar.gzip")


def _export(ref: str, out: Path, cache: Path) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "rootfs-export"), "export", ref,
            "-o", str(out), "--ext4-method", "mount", "--cache-dir", str(cache), "--json"]


def _mounts_under(where: Path) -> list[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if line.startswith(str(where))]


@needs_loop
def test_next_mount_export_cleans_up_after_a_killed_one(registry: Any, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    request.addfinalizer(mountstate.reap_stale)     # whatever happens, leave nothing mounted
    big = push_image(registry, "package/killed-mid-apply", "v1", [ZerosLayer(BIG)])  # type: ignore[list-item]
    small = push_image(registry, "package/after-the-kill", "v1",
                       [Layer.from_entries([file("etc/hostname", "vm\n")])])
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    first.mkdir()
    proc = subprocess.Popen(_export(big.reference, first / "big.ext4", cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _mounts_under(first):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the export never mounted its image"
            time.sleep(0.02)
        time.sleep(0.3)                               # well into the apply
        assert proc.poll() is None, "the export finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # what a SIGKILL leaves: the mount, its loop device, the work dir with a partial image
    (mnt,) = _mounts_under(first)
    assert os.path.basename(mnt).startswith(mountstate.MOUNT_PREFIX)
    assert str(proc.pid) in os.path.basename(mnt)
    assert any(mountstate.IMAGE_PREFIX in line for line in leftovers(str(first)))
    work = Path(mnt).parent
    assert work.parent == first and work.name.startswith(".big.ext4.")
    assert not (first / "big.ext4").exists()

    second = tmp_path / "second"
    second.mkdir()
    p = subprocess.run(_export(small.reference, second / "small.ext4", cache),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["extra"]["ext4_method"] == "mount"
    assert leftovers(str(first)) == [] and leftovers(str(second)) == []
    assert _mounts_under(tmp_path) == []
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in losetup
    assert not work.exists() and os.listdir(first) == []
    assert f"pid {proc.pid}" in p.stderr and f"unmounted {mnt}" in p.stderr
    assert "detached /dev/loop" in p.stderr and "removed its work directory" in p.stderr
    assert not list(mountstate.state_dir().glob(f"{proc.pid}.*.json"))


@needs_loop
def test_mounts_of_live_processes_are_left_alone(tmp_path: Path) -> None:
    image = tmp_path / mountstate.image_name()
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image), "8M"], check=True)
    mnt = tmp_path / mountstate.mount_name()
    mnt.mkdir()
    with loop_mounted(image, mnt, work=tmp_path):
        records = list(mountstate.state_dir().glob(f"{os.getpid()}.*.json"))
        assert len(records) == 1
        assert json.loads(records[0].read_text())["device"].startswith("/dev/loop")
        assert not [done for done in mountstate.reap_stale() if str(tmp_path) in done]
        assert leftovers(str(tmp_path))                 # still mounted and attached
    assert leftovers(str(tmp_path)) == []
    assert not list(mountstate.state_dir().glob(f"{os.getpid()}.*.json"))
