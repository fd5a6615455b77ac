"""Thin wrappers around the e2fsprogs tools (mke2fs, e2fsck, resize2fs, dumpe2fs, debugfs).

Every tool runs with a fixed environment: our own ``mke2fs.conf`` (so results never depend on
``/etc/mke2fs.conf``), ``LC_ALL=C.UTF-8`` (parsable output, UTF-8 names) and fixed clocks
(``E2FSPROGS_FAKE_TIME`` for mke2fs/resize2fs/debugfs, ``E2FSCK_TIME`` for e2fsck) so that
the same input gives the same bytes. ``SOURCE_DATE_EPOCH`` is deliberately removed: in
mke2fs 1.47.x it also clamps every file's mtime.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from worker.errors import PackagingError, ToolMissing

#: filesystem times (creation, last write, last check, lost+found, root without metadata)
#: 2020-01-01T00:00:00Z; any fixed value works, this one is after e2fsck's "insane clock" cut-off.
FIXED_TIME = 1577836800

#: first e2fsprogs release whose ``mke2fs -d -`` reads a tar stream from stdin
STREAM_MIN_VERSION = (1, 47, 1)

BLOCK_SIZE = 4096
INODE_SIZE = 256

# Our mke2fs.conf: the few [defaults] mke2fs consults even when -O/-N/-b/-I are explicit.
# Features are always passed as an explicit "-O none,..." list (see features.py). The size
# classes (floppy ... huge) exist, empty, because mke2fs warns about undefined ones; our -b and
# -N override what the host's file sets for them.
MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	hash_alg = half_md4
	lazy_itable_init = 1
	lazy_journal_init = 1
	reserved_ratio = 0

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
	floppy = {
	}
	small = {
	}
	default = {
	}
	big = {
	}
	huge = {
	}
"""

_conf_lock = threading.Lock()
_conf_path: str | None = None


def _private_dir() -> str:
    """A directory only this user can write: ``$TMPDIR/rootfs-export-<uid>`` when it is ours
    (a directory, not a symlink, owned by us, mode 0700), else a fresh one for this process.

    Another local user can create that shared name first; they must not be able to make our
    exports fail, nor see or swap our files: then this process makes its own (``mkdtemp``,
    removed at exit).
    """
    uid = os.geteuid()
    path = os.path.join(tempfile.gettempdir(), f"rootfs-export-{uid}")
    with contextlib.suppress(OSError):
        os.mkdir(path, 0o700)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
            return path
    try:
        own = tempfile.mkdtemp(prefix=f"rootfs-export-{uid}-")
    except OSError as exc:
        raise PackagingError(f"cannot create a private directory in {tempfile.gettempdir()}: "
                             f"{exc.strerror or exc}") from exc
    atexit.register(shutil.rmtree, own, True)
    return own


def _mke2fs_conf() -> str:
    """Path of our mke2fs.conf: one file per content in a private directory, shared by all
    processes of this user (written atomically once, never left behind per process)."""
    global _conf_path
    with _conf_lock:
        if _conf_path is not None and os.path.exists(_conf_path):
            return _conf_path
        digest = hashlib.sha256(MKE2FS_CONF.encode()).hexdigest()[:16]
        directory = _private_dir()
        path = os.path.join(directory, f"mke2fs-{digest}.conf")
        try:
            with open(path, encoding="utf-8") as f:
                current: str | None = f.read()
        except FileNotFoundError:
            current = None
        if current != MKE2FS_CONF:
            fd, tmp = tempfile.mkstemp(prefix=".mke2fs-", suffix=".conf", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(MKE2FS_CONF)
            os.replace(tmp, path)
        _conf_path = path
        return path


def tool_env() -> dict[str, str]:
    """The environment every e2fsprogs tool runs with (see the module docstring)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOURCE_DATE_EPOCH", "MKE2FS_SYNC", "MKE2FS_DEVICE_SECTSIZE",
                        "MKE2FS_DEVICE_PHYS_SECTSIZE", "MKE2FS_FIRST_META_BG",
                        "E2FSPROGS_LIBMAGIC_SUPPRESS")}
    env.update({
        # English messages we can parse, but UTF-8: under plain "C" the libarchive in
        # mke2fs -d - cannot convert UTF-8 tar names ("Pathname can't be converted from UTF-8
        # to current locale"). Where C.UTF-8 is missing (glibc < 2.35) programs fall back to C.
        "LC_ALL": "C.UTF-8",
        "MKE2FS_CONFIG": _mke2fs_conf(),
        "E2FSPROGS_FAKE_TIME": str(FIXED_TIME),
        "E2FSCK_TIME": str(FIXED_TIME),
        "E2FSCK_CONFIG": "/dev/null",
    })
    # PATH must reach /sbin tools even for unprivileged users whose PATH omits it.
    path = env.get("PATH", "/usr/bin:/bin")
    for extra in ("/usr/sbin", "/sbin"):
        if extra not in path.split(":"):
            path += ":" + extra
    env["PATH"] = path
    return env


def find_tool(name: str) -> str:
    """Absolute path of an e2fsprogs/util-linux tool; ToolMissing naming the package if absent."""
    found = shutil.which(name, path=tool_env()["PATH"])
    if not found:
        package = "mount" if name in ("losetup", "mount", "umount") else "e2fsprogs"
        raise ToolMissing(f"{name} not found on PATH: install {package} "
                          f"(e2fsprogs >= 1.47.1 for rootless streaming, bookworm-backports on Debian 12)")
    return found


@dataclass(frozen=True, slots=True)
class ToolResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run_tool(args: Sequence[str], *, check: bool = True, what: str | None = None,
             timeout: float | None = None, ok_codes: Sequence[int] = (0,),
             input: bytes | None = None) -> ToolResult:
    """Run an e2fsprogs tool with :func:`tool_env`; PackagingError with its output on failure."""
    argv = [find_tool(args[0]), *args[1:]]
    try:
        proc = subprocess.run(argv, env=tool_env(), input=input, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PackagingError(f"{what or args[0]} timed out after {timeout:.0f}s: "
                             f"{' '.join(argv)}") from exc
    result = ToolResult(tuple(argv), proc.returncode,
                        proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
    if check and proc.returncode not in ok_codes:
        raise PackagingError(f"{what or args[0]} failed (exit {proc.returncode}): "
                             f"{' '.join(argv)}\n{tail(result.stderr or result.stdout)}")
    return result


def tail(text: str, lines: int = 25) -> str:
    """Last ``lines`` lines of tool output, for error messages."""
    parts = text.strip().splitlines()
    if len(parts) > lines:
        parts = ["...", *parts[-lines:]]
    return "\n".join(parts)


@lru_cache(maxsize=1)
def e2fsprogs_version() -> tuple[int, ...]:
    """The installed e2fsprogs version, from ``mke2fs -V``."""
    res = run_tool(["mke2fs", "-V"], check=False)
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", res.stdout + res.stderr)
    if not m:
        raise ToolMissing(f"cannot tell the mke2fs version from: {tail(res.stderr or res.stdout, 3)}")
    return tuple(int(g or 0) for g in m.groups())


_stream_lock = threading.Lock()
_stream_support: dict[str, tuple[bool, str]] = {}


def tar_stream_support() -> tuple[bool, str]:
    """Whether ``mke2fs -d -`` reads a tar from stdin here, and why not if it does not.

    Needs e2fsprogs >= 1.47.1 built with libarchive (loaded with dlopen at run time, so a
    missing libarchive13 only shows when used): a tiny probe run proves it. Cached per process.
    """
    with _stream_lock:
        if "result" in _stream_support:
            return _stream_support["result"]
        try:
            version = e2fsprogs_version()
        except ToolMissing as exc:
            result = (False, str(exc))
        else:
            if version < STREAM_MIN_VERSION:
                result = (False, "mke2fs {} is older than 1.47.1 (no tar input)".format(
                    ".".join(map(str, version))))
            else:
                result = _probe_tar_stream()
        _stream_support["result"] = result
        return result


def _probe_tar_stream() -> tuple[bool, str]:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("probe")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"probe"))
    with tempfile.TemporaryDirectory(prefix="rootfs-export-probe-") as tmp:
        img = os.path.join(tmp, "probe.img")
        res = run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", "-", img, "2M"],
                       check=False, input=buf.getvalue(), timeout=60)
        if res.returncode != 0:
            return False, f"mke2fs -d - probe failed: {tail(res.stderr or res.stdout, 5)}"
        check = run_tool(["debugfs", "-R", "cat /probe", img], check=False, timeout=60)
        if check.stdout != "probe":
            return False, "mke2fs -d - probe did not store the file (libarchive missing?)"
    return True, ""


def fsck_check(image: str | os.PathLike[str]) -> None:
    """``e2fsck -fn``: PackagingError with e2fsck's output unless the filesystem is clean."""
    res = run_tool(["e2fsck", "-fn", os.fspath(image)], check=False, timeout=3600)
    if res.returncode != 0:
        raise PackagingError(f"e2fsck -fn found problems in {image} (exit {res.returncode}):\n"
                             f"{tail(res.stdout + res.stderr, 40)}")


def fsck_fix(image: str | os.PathLike[str]) -> None:
    """``e2fsck -f -y`` (needed before resize2fs); exit 1 ("fixed") is acceptable."""
    run_tool(["e2fsck", "-f", "-y", os.fspath(image)], what="e2fsck -f -y", ok_codes=(0, 1),
             timeout=3600)


def resize(image: str | os.PathLike[str], blocks: int | None = None) -> None:
    """``resize2fs IMAGE BLOCKS`` (4 KiB blocks), or ``resize2fs -M`` when ``blocks`` is None."""
    if blocks is None:
        run_tool(["resize2fs", "-M", os.fspath(image)], what="resize2fs -M", timeout=3600)
    else:
        run_tool(["resize2fs", os.fspath(image), str(blocks)], timeout=3600)


def superblock(image: str | os.PathLike[str]) -> dict[str, str]:
    """``dumpe2fs -h`` as a dict of ``Field name: value`` lines."""
    res = run_tool(["dumpe2fs", "-h", os.fspath(image)], timeout=600)
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            out.setdefault(key.strip(), value.strip())
    return out


#: debugfs reads a script line into a BUFSIZ (8192) buffer; two arguments must fit in one line
DEBUGFS_MAX_ARG = 4000


class DebugfsUnsafe(PackagingError):
    """A string (path, link target, xattr name) that cannot go into a debugfs script line."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"debugfs cannot take {text!r} in a script line: {reason}")


def debugfs_refusal(text: str) -> str | None:
    """Why ``text`` cannot be one argument of a debugfs script line; None when it can.

    The one check for everything that enters a debugfs script. debugfs reads its script with
    ``fgets`` and cuts each line at the first newline *and* at the first carriage return, so
    either would end the argument early and start a new command; the ss parser splits words on
    blanks outside double quotes and reads ``""`` inside them as one quote, which
    :func:`debugfs_quote` relies on. Every other control character (tab, escape, DEL) is refused
    too: nothing legitimate needs them and no parser quirk can then reach us.
    """
    raw = os.fsencode(text)
    if len(raw) >= DEBUGFS_MAX_ARG:
        return f"{len(raw)} bytes, more than a debugfs script line holds ({DEBUGFS_MAX_ARG - 1})"
    for byte in raw:
        if byte < 0x20 or byte == 0x7F:
            return f"control character 0x{byte:02x}"
    return None


def debugfs_quote(text: str) -> str:
    """Quote one argument for a debugfs command line (ss parser: ``"..."``, ``""`` for a quote).

    Raises :class:`DebugfsUnsafe` when :func:`debugfs_refusal` refuses ``text``: no caller can
    put a string into a script without this check.
    """
    why = debugfs_refusal(text)
    if why is not None:
        raise DebugfsUnsafe(text, why)
    return '"' + text.replace('"', '""') + '"'


def debugfs_script(image: str | os.PathLike[str], commands: Sequence[str], *,
                   write: bool = False) -> ToolResult:
    """Run debugfs commands from a script file; PackagingError if any command complained.

    debugfs exits 0 even when a command fails, so its stderr is the verdict (the version banner
    is the only line expected there).
    """
    # Last line of defence: a command holding a line break would be two commands.
    for cmd in commands:
        if any(b < 0x20 or b == 0x7F for b in os.fsencode(cmd)):
            raise PackagingError(f"refusing a debugfs command with a control character: {cmd!r}")
    with tempfile.NamedTemporaryFile("wb", prefix="rootfs-export-debugfs-", suffix=".cmd") as f:
        for cmd in commands:
            f.write(os.fsencode(cmd) + b"\n")
        f.flush()
        args = ["debugfs", *(["-w"] if write else []), "-f", f.name, os.fspath(image)]
        res = run_tool(args, timeout=3600)
    problems = [ln for ln in res.stderr.splitlines()
                if ln.strip() and not ln.startswith("debugfs ")]
    if problems:
        raise PackagingError(f"debugfs failed on {image}:\n{tail(chr(10).join(problems))}")
    return res
