"""Records of the mount method's loop mounts, so that what a killed run left mounted is cleaned
up by the next one.

A SIGKILL (or a power cut of the process: OOM killer, ``kill -9`` of a stuck worker) runs no
cleanup: the image stays mounted on its work directory and attached to a loop device. So,
before it attaches anything, the mount method writes a record (a small JSON file) in a private,
root-only state directory: its pid and that pid's start time (a reused pid is not the same
process), the backing image, the mount point, the work directory and, once attached, the loop
device. The mount point and the backing file carry the same owner in their names
(``rootfs-export-mnt.<pid>.<start>``, ``rootfs-export-image.<pid>.<start>.ext4``), so a mount
or loop device of ours is recognised even where its record is missing.

:func:`reap_stale` runs before every mount-method build: whatever belongs to an owner that is
gone is unmounted, detached and removed (its work directory holds only a partial image), and
each step is logged. Mounts of live processes are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from worker import staging
from worker.errors import PackagingError
from worker.package.e2fs import find_tool, tool_env

log = logging.getLogger(__name__)

MOUNT_PREFIX = "rootfs-export-mnt."
IMAGE_PREFIX = "rootfs-export-image."
_OWNER = r"(\d+)\.(\d+)"
_MOUNT_RE = re.compile(re.escape(MOUNT_PREFIX) + _OWNER + "$")
_IMAGE_RE = re.compile(re.escape(IMAGE_PREFIX) + _OWNER + r"\.ext4$")
#: the work directories build_ext4 makes next to the output: ``.NAME.XXXXXXXX.tmp``
_WORK_RE = re.compile(r"^\..+\.tmp$")
_STATE_DIRS = ("/run/rootfs-export/mounts",)


@dataclass(frozen=True, slots=True)
class MountRecord:
    pid: int
    start: int                  # the pid's start time (clock ticks since boot)
    image: str                  # backing file
    mountpoint: str
    work: str                   # the work directory holding both (removed when stale)
    device: str = ""            # the loop device, once attached

    @property
    def owner(self) -> tuple[int, int]:
        return self.pid, self.start


def current_owner() -> tuple[int, int]:
    """(pid, start time) of this process: the owner a mount's names and record carry."""
    try:
        return staging.current_owner()
    except staging.OwnerUnknown as exc:
        raise PackagingError(str(exc)) from None


def mount_name() -> str:
    """The mount point's name for this process (carries its owner)."""
    return "{}{}.{}".format(MOUNT_PREFIX, *current_owner())


def image_name() -> str:
    """The loop backing file's name for this process (carries its owner)."""
    return "{}{}.{}.ext4".format(IMAGE_PREFIX, *current_owner())


def state_dir() -> Path:
    """The private (0700, ours) directory holding the records; created on first use."""
    candidates = [Path(p) for p in _STATE_DIRS]
    candidates.append(Path(tempfile.gettempdir()) / f"rootfs-export-{os.geteuid()}" / "mounts")
    for d in candidates:
        try:
            d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.mkdir(mode=0o700, exist_ok=True)
            if all(_private(p) for p in (d.parent, d)):
                return d
        except OSError:
            continue
    raise PackagingError("no private directory for mount records (tried "
                         + ", ".join(map(str, candidates)) + ")")


def _private(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _record_path(pid: int, start: int) -> Path:
    return state_dir() / f"{pid}.{start}.json"


def write_record(rec: MountRecord) -> Path:
    """Write (or replace) the record of ``rec``'s owner, atomically."""
    path = _record_path(rec.pid, rec.start)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(rec), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def remove_record(rec: MountRecord) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(rec.pid, rec.start).unlink()


def _records() -> list[tuple[Path, MountRecord]]:
    out = []
    for p in sorted(state_dir().glob("*.json")):
        try:
            rec = MountRecord(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable mount record %s: %s", p, exc)
            continue
        out.append((p, rec))
    return out


def _unescape(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point in this mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split()[4]) for line in f if len(line.split()) > 4]


def loop_devices() -> list[tuple[str, str]]:
    """(device, backing file) of every attached loop device; a deleted file keeps its path."""
    proc = subprocess.run([find_tool("losetup"), "--list", "--json", "-O", "NAME,BACK-FILE"],
                          capture_output=True, text=True, env=tool_env(), check=False,
                          timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    try:
        rows = json.loads(proc.stdout).get("loopdevices", [])
    except ValueError:
        return []
    out = []
    for row in rows:
        back = (row.get("back-file") or "").removesuffix(" (deleted)")
        out.append((row.get("name") or "", back))
    return out


def _owner_of(name: str, pattern: re.Pattern[str]) -> tuple[int, int] | None:
    m = pattern.match(os.path.basename(name))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _run(args: list[str]) -> tuple[bool, str]:
    proc = subprocess.run([find_tool(args[0]), *args[1:]], capture_output=True, text=True,
                          env=tool_env(), check=False, timeout=120)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


@contextlib.contextmanager
def _reap_lock() -> Iterator[None]:
    fd = os.open(state_dir() / "reap.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def reap_stale() -> list[str]:
    """Unmount, detach and remove what a rootfs-export process that is gone left behind.

    Owners come from the records and from our names in the mount table and among the loop
    devices; an owner still running is left alone. Returns what was done (each also logged
    as a warning); a step that fails is logged and its record kept for the next run.
    """
    done: list[str] = []
    with _reap_lock():
        records = {rec.owner: (path, rec) for path, rec in _records()}
        mounts = mount_points()
        loops = loop_devices()
        owners: set[tuple[int, int]] = set(records)
        owners.update(o for o in (_owner_of(m, _MOUNT_RE) for m in mounts) if o)
        owners.update(o for o in (_owner_of(b, _IMAGE_RE) for _, b in loops) if o)
        for owner in sorted(owners):
            if staging.alive(*owner):
                continue
            path, rec = records.get(owner, (None, None))
            done += _reap_owner(owner, rec, path, mounts, loops)
    return done


def _reap_owner(owner: tuple[int, int], rec: MountRecord | None, path: Path | None,
                mounts: list[str], loops: list[tuple[str, str]]) -> list[str]:
    pid = owner[0]
    done: list[str] = []
    ok = True

    def say(text: str) -> None:
        log.warning("stale mount of rootfs-export pid %d (no longer running): %s", pid, text)
        done.append(text)

    def outcome(succeeded: bool, why: str, did: str, failed: str) -> None:
        nonlocal ok
        if succeeded:
            say(did)
        else:
            ok = False
            log.error("cannot %s: %s", failed, why)

    targets = [m for m in mounts if _owner_of(m, _MOUNT_RE) == owner
               or (rec is not None and m == rec.mountpoint)]
    for target in sorted(set(targets), key=len, reverse=True):
        umounted, why = _run(["umount", target])
        if not umounted:
            umounted, why = _run(["umount", "--lazy", target])
        outcome(umounted, why, f"unmounted {target}", f"unmount stale {target}")
    images = {rec.image} if rec is not None else set()
    for device, back in loops:
        if _owner_of(back, _IMAGE_RE) == owner or back in images:
            detached, why = _run(["losetup", "-d", device])
            outcome(detached, why, f"detached {device} ({back})", f"detach stale {device}")
    works = {os.path.dirname(t) for t in targets}
    works.update(os.path.dirname(b) for _, b in loops if _owner_of(b, _IMAGE_RE) == owner)
    if rec is not None:
        works.add(rec.work)
    if ok:
        for work in sorted(works):
            if (_WORK_RE.match(os.path.basename(work)) and os.path.isdir(work)
                    and not os.path.islink(work)
                    and not any(m == work or m.startswith(work + "/") for m in mount_points())):
                shutil.rmtree(work, ignore_errors=True)
                say(f"removed its work directory {work}")
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return done
