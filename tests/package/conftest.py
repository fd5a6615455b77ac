"""Fixtures for the ext4 packaging tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.package.loop import loop_mounted


def _loop_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: loop devices and mount need root"
    if not os.path.exists("/dev/loop-control"):
        return "this machine has no loop devices (/dev/loop-control is missing)"
    return None


LOOP_SKIP = _loop_reason()
needs_loop = pytest.mark.skipif(LOOP_SKIP is not None, reason=LOOP_SKIP or "")


@contextmanager
def mounted_ro(image: Path, where: Path) -> Iterator[Path]:
    """Loop-mount ``image`` read-only (no journal replay) for inspection."""
    where.mkdir(parents=True, exist_ok=True)
    with loop_mounted(image, where, options="ro,noload,nosuid,nodev") as mnt:
        yield mnt


def leftovers(needle: str) -> list[str]:
    """Mounts and loop devices whose target or backing file mentions ``needle`` (a path)."""
    found = []
    mounts = subprocess.run(["findmnt", "-rn", "-o", "SOURCE,TARGET"], capture_output=True,
                            text=True, check=False).stdout
    found += [line for line in mounts.splitlines() if needle in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                           check=False).stdout
    found += [line for line in loops.splitlines() if needle in line]
    return found


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory an unprivileged user can reach and write (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="rootfs-export-shared-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
