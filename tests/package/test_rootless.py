"""The direct and stream methods need no privileges; the others say clearly what they cannot do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.package.helpers import debugfs, fsck

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534

pytestmark = pytest.mark.needs_root(reason="needs root to switch to an unprivileged user")




def run_unprivileged(tmp_path: Path, method: str, *extra: str) -> dict[str, Any]:
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": str(ROOT),
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(work)}
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "tests.package.unprivileged", str(work), method, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["euid"] == NOBODY
    return report


def _check_image(image: Path) -> None:
    assert fsck(image).returncode == 0
    st = debugfs(image, "stat /home/alice/notes")
    assert "User:  1000   Group:  1000" in st and "Mode:  0600" in st
    assert "Mode:  0700" in debugfs(image, "stat /home/alice")
    shadow = debugfs(image, "stat /etc/shadow")
    assert "Mode:  0000" in shadow and "User:     0   Group:     0" in shadow
    su = debugfs(image, "stat /usr/bin/su")
    assert "Mode:  04755" in su and "User:     0   Group:     0" in su
    dev = debugfs(image, "stat /dev/sda")
    assert "block special" in dev and "08:00" in dev and "Group:     6" in dev
    assert "Mode:  0660" in dev
    assert "character special" in debugfs(image, "stat /dev/null")
    assert "security.capability" in debugfs(image, "ea_list /usr/bin/ping")
    assert "mtime: 0x53724e00" in debugfs(image, "stat /etc")   # 1_400_000_000


def test_direct_as_nobody_keeps_owners_modes_devices_and_caps(shared_tmp: Path) -> None:
    # auto picks the direct writer, which needs no privilege at all
    report = run_unprivileged(shared_tmp, "auto")
    assert report.get("error") is None, report
    assert report["method"] == "direct" and report["warnings"] == []
    _check_image(Path(report["output"]))
    assert report["leftovers"] == []


def test_stream_as_nobody_keeps_owners_modes_devices_and_caps(shared_tmp: Path) -> None:
    report = run_unprivileged(shared_tmp, "stream")
    assert report.get("error") is None, report
    assert report["method"] == "stream" and report["warnings"] == []
    _check_image(Path(report["output"]))
    assert report["leftovers"] == []


def test_mount_method_as_nobody_is_refused_clearly(shared_tmp: Path) -> None:
    report = run_unprivileged(shared_tmp, "mount")
    assert report["error"] == "PackagingError"
    assert "needs root" in report["message"]
    assert report["leftovers"] == []


def test_dir_method_as_nobody_restores_owners_modes_devices_and_caps(shared_tmp: Path) -> None:
    # mke2fs -d DIR as non-root copies the invoking user's ownership and cannot read mode-0000
    # files; the dir method stages readable copies and restores everything with debugfs.
    report = run_unprivileged(shared_tmp, "dir", "--strict")
    assert report.get("error") is None, report
    assert report["method"] == "dir" and report["warnings"] == []
    _check_image(Path(report["output"]))
    assert report["leftovers"] == []


def test_dir_method_as_nobody_warns_or_refuses_what_it_cannot_restore(shared_tmp: Path) -> None:
    # debugfs scripts are line-based: a name with a newline cannot have its owner restored.
    report = run_unprivileged(shared_tmp, "dir", "--strict", "--newline")
    assert report["error"] == "PackagingError"
    assert "--strict" in report["message"] and "ownership" in report["message"]
    assert report["leftovers"] == []
    shutil.rmtree(shared_tmp / "work")
    report = run_unprivileged(shared_tmp, "dir", "--newline")
    assert report.get("error") is None, report
    assert any("cannot address" in w for w in report["warnings"])


def test_ext4_dir_export_as_nobody_reports_only_the_images_warnings(
        registry: Any, shared_tmp: Path) -> None:
    # The dir writer, as non-root, cannot chown the staging tree and says so in its own report;
    # the dir method restores those owners in the image, so the export must not repeat it.
    from tests.support.imagebuilder import Layer, file, push_image

    img = push_image(registry, "package/nobody-dir", "v1", [Layer.from_entries([
        file("etc/owned", "x", uid=1234, gid=4321, mode=0o640), file("etc/mine", "y")])])
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    (work / "docker").mkdir()
    os.chown(work / "docker", NOBODY, NOBODY)
    exe = str(Path(sys.executable).parent / "rootfs-export")
    out = work / "root.ext4"
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", exe,
         "export", img.reference, "-o", str(out), "--ext4-method", "dir", "--json",
         "--cache-dir", str(work / "cache")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, DOCKER_CONFIG=str(work / "docker"), TMPDIR=str(work)))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["extra"]["ext4_method"] == "dir"
    assert doc["warnings"] == [], doc["warnings"]
    assert "could not be preserved" not in proc.stderr
    st = debugfs(out, "stat /etc/owned")
    assert "User:  1234   Group:  4321" in st and "Mode:  0640" in st
