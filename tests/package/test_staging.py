"""What a killed run leaves beside an output is removed by the next run writing that output."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.package.helpers import build, make_plan
from tests.support.imagebuilder import directory, file
from tests.support.root import require_root
from worker.flatten.dirout import write_dir
from worker.flatten.tarout import write_tar_file
from worker.staging import process_start, sweep_stale, temp_prefix


def dead_owner() -> tuple[int, int]:
    """(pid, start time) of a real process that has been SIGKILLed."""
    proc = subprocess.Popen(["sleep", "600"])
    start = process_start(proc.pid)
    assert start is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.pid, start


def leftovers(out: Path) -> tuple[Path, Path, Path]:
    """A dead run's work directory and temp file for ``out``, and a live run's directory."""
    pid, start = dead_owner()
    dead_dir = out.parent / f".{out.name}.rfx-{pid}.{start}.abcd1234.tmp"
    (dead_dir / "staging").mkdir(parents=True)
    (dead_dir / "staging" / "partial").write_bytes(b"x" * 4096)
    dead_file = out.parent / f".{out.name}.rfx-{pid}.{start}.efgh5678"
    dead_file.write_bytes(b"half a tar")
    live = out.parent / (temp_prefix(out) + "live.tmp")
    live.mkdir()
    return dead_dir, dead_file, live


@pytest.mark.parametrize("fmt", ["ext4", "tar", "dir"])
def test_next_run_removes_what_a_killed_run_left(tmp_path: Path, fmt: str) -> None:
    plan, locate = make_plan(tmp_path, [[directory("etc"), file("etc/motd", b"hi\n")]])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"root.{fmt}"
    dead_dir, dead_file, live = leftovers(out)
    other = out_dir / ".someone-else.rfx-1.1.tmp"     # not this output's: never touched
    other.mkdir()
    if fmt == "ext4":
        build(plan, locate, out, method="direct")
    elif fmt == "tar":
        write_tar_file(plan, out, locate)
    else:
        write_dir(plan, out, locate)
    assert out.exists()
    assert not dead_dir.exists() and not dead_file.exists()
    assert live.is_dir() and other.is_dir()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [out.name, live.name, other.name])


def test_sweep_leaves_a_directory_with_a_mount_inside(tmp_path: Path) -> None:
    out = tmp_path / "root.ext4"
    pid, start = dead_owner()
    work = tmp_path / f".{out.name}.rfx-{pid}.{start}.zz.tmp"
    (work / "mnt").mkdir(parents=True)
    require_root("mounts a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(work / "mnt")],
                   check=True)
    try:
        (work / "mnt" / "keep").write_text("still here")
        assert sweep_stale(out) == []
        assert (work / "mnt" / "keep").read_text() == "still here"
    finally:
        subprocess.run(["umount", str(work / "mnt")], check=True)
    assert sweep_stale(out) == [work] and not work.exists()
