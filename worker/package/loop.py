"""Loop devices and mounts for the ``mount`` method, with cleanup on every path.

:func:`loop_mounted` attaches an image with ``losetup --find --show``, mounts it
``nosuid,nodev,noexec`` and, whatever happens inside the ``with`` block (an exception, a
cancel, a KeyboardInterrupt, even one arriving during cleanup), unmounts and detaches before
it returns or raises. Given ``work``, the mount is also recorded (worker/package/mountstate.py)
from before the loop device is attached until both are gone, so that if this process is killed
outright the next mount-method run cleans up after it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worker.errors import PackagingError
from worker.package import mountstate
from worker.package.e2fs import find_tool, tail, tool_env

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "nosuid,nodev,noexec"


def loop_available() -> tuple[bool, str]:
    """Whether this process can attach loop devices and mount, and why not if it cannot."""
    if os.geteuid() != 0:
        return False, "the mount method needs root (loop devices and mount)"
    if not os.path.exists("/dev/loop-control"):
        return False, "this machine has no loop devices (/dev/loop-control is missing)"
    try:
        for tool in ("losetup", "mount", "umount"):
            find_tool(tool)
    except PackagingError as exc:
        return False, str(exc)
    return True, ""


def _run(args: list[str], what: str, timeout: float = 120) -> str:
    argv = [find_tool(args[0]), *args[1:]]
    try:
        proc = subprocess.run(argv, env=tool_env(), capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(f"{what} timed out: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).decode(errors="replace")
        raise PackagingError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                             f"{tail(out)}")
    return proc.stdout.decode(errors="replace")


def _cleanup_step(args: list[str], what: str,
                  attempts: int = 5) -> tuple[bool, BaseException | None]:
    """Run a cleanup command, retrying (a busy mount, an interrupt): never raises.

    Returns whether it succeeded, and a KeyboardInterrupt that arrived during cleanup (the
    caller re-raises it after every step ran).
    """
    interrupted: BaseException | None = None
    for attempt in range(attempts):
        try:
            _run(args, what)
            return True, interrupted
        except KeyboardInterrupt as exc:
            interrupted = exc
        except PackagingError as exc:
            log.warning("%s (attempt %d of %d)", exc, attempt + 1, attempts)
            time.sleep(0.2 * (attempt + 1))
    log.error("giving up: %s", " ".join(args))
    return False, interrupted


def attached_devices(image: str | os.PathLike[str]) -> list[str]:
    """Loop devices currently backed by ``image`` (``losetup -j``)."""
    out = _run(["losetup", "-j", os.fspath(image)], "losetup -j")
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


@contextmanager
def loop_mounted(image: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *,
                 options: str = MOUNT_OPTIONS, fstype: str = "ext4",
                 work: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Attach ``image`` to a free loop device and mount it on ``mountpoint`` for the block.

    ``work``: the private directory holding image and mount point; the mount is recorded
    for :func:`worker.package.mountstate.reap_stale` until it is undone.
    """
    record = None
    if work is not None:
        pid, start = mountstate.current_owner()
        record = mountstate.MountRecord(pid, start, os.path.abspath(image),
                                        os.path.abspath(mountpoint), os.path.abspath(work))
        mountstate.write_record(record)
    try:
        device = _run(["losetup", "--find", "--show", os.fspath(image)], "losetup").strip()
    except BaseException:
        if record is not None:
            mountstate.remove_record(record)
        raise
    if not device.startswith("/dev/"):
        raise PackagingError(f"losetup printed no device for {image}: {device!r}")
    if record is not None:
        record = mountstate.MountRecord(record.pid, record.start, record.image,
                                        record.mountpoint, record.work, device)
        mountstate.write_record(record)
    mounted = False
    try:
        _run(["mount", "-t", fstype, "-o", options, device, os.fspath(mountpoint)],
             f"mounting {image} on {mountpoint}")
        mounted = True
        yield Path(mountpoint)
    finally:
        pending: list[BaseException] = []
        clean = True
        if mounted:
            ok, exc = _cleanup_step(["umount", os.fspath(mountpoint)],
                                    f"unmounting {mountpoint}")
            clean = clean and ok
            if exc is not None:
                pending.append(exc)
        ok, exc = _cleanup_step(["losetup", "-d", device], f"detaching {device}")
        clean = clean and ok
        if exc is not None:
            pending.append(exc)
        if record is not None and clean:   # else the next run's reap_stale retries
            mountstate.remove_record(record)
        if pending:
            raise pending[0]
