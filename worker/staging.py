"""Temporary names beside an output, and the sweep of those a killed run left behind.

Every output (ext4 image, tar, directory, sidecar) is built under a hidden temporary name next
to its final path and renamed into place on success; any failure removes it. A run killed
outright (SIGKILL, the OOM killer) removes nothing, so the temporary name carries its owner:
the pid and that pid's start time (a reused pid is not the same process). The next run that
writes the same output removes what owners that are gone left there; never what a live process
is building, and never a directory with something mounted inside it (the mount method's reaper,
:mod:`worker.package.mountstate`, unmounts those first).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

#: ``.NAME.rfx-<pid>.<start>.`` + a random part the tempfile module adds
_TAG = "rfx-"


class OwnerUnknown(OSError):
    """This process's start time cannot be read from /proc."""


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs."""
    return process_start(pid) == start


def current_owner() -> tuple[int, int]:
    """(pid, start time) of this process; OwnerUnknown where /proc cannot tell."""
    pid = os.getpid()
    start = process_start(pid)
    if start is None:
        raise OwnerUnknown("cannot read this process's start time from /proc")
    return pid, start


def temp_prefix(output: Path) -> str:
    """The prefix for ``tempfile.mkstemp``/``mkdtemp`` beside ``output`` (owner included;
    without /proc, a plain one that no sweep will ever match)."""
    try:
        return "." + output.name + ".{}{}.{}.".format(_TAG, *current_owner())
    except OwnerUnknown:
        return "." + output.name + ".tmp-"


def _mounted_under(path: Path) -> bool:
    top = str(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                      for line in f if len(line.split()) > 4]
    except OSError:
        return True     # cannot tell: leave it
    return any(p == top or p.startswith(top + "/") for p in points)


def sweep_stale(output: Path) -> list[Path]:
    """Remove the temporary files and directories of dead runs beside ``output``; return them.

    Only names made by :func:`temp_prefix` for this very output name are considered.
    """
    pattern = re.compile(re.escape("." + output.name + "." + _TAG) + r"(\d+)\.(\d+)\.")
    removed: list[Path] = []
    try:
        siblings = list(os.scandir(output.parent))
    except OSError:
        return removed
    for entry in siblings:
        m = pattern.match(entry.name)
        if m is None or alive(int(m.group(1)), int(m.group(2))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if _mounted_under(path):
                    log.warning("leaving %s: something is mounted inside it", path)
                    continue
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by a run that is gone: %s", path, exc)
            continue
        log.info("removed %s, left by a run that is gone", path)
        removed.append(path)
    return removed
