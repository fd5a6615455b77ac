"""Package a flattened plan as an ext4 disk image (the main job).

Four methods produce equivalent trees (see :class:`~worker.export.Ext4Method`):

``direct`` (what ``auto`` picks for the ``default`` and ``compat`` feature profiles)
    our own writer (``ext4fs/``) lays the filesystem out itself from the plan: inodes,
    directories, xattrs, journal and orphan file are decided before any layer is read, then
    each layer is read once and its files' data goes out in stream order as large sequential
    ``pwrite`` calls into a sparse image file. Rootless, reproducible byte for byte, no
    e2fsprogs in the write path (e2fsck still checks the result). Every group's bitmaps and
    inode tables are packed after the primary descriptors (one flex group), directories are
    linear (as ``mke2fs -d`` makes them), xattrs go in the inode where they fit and into one
    (shared) block otherwise. It leaves ``resize_inode`` out (the superblock and the build
    report say so), and refuses with a ConfigError any other feature list it does not write.
``stream``
    the flattened tar is written by ``write_tar`` (in a thread) into the stdin of
    ``mke2fs -t ext4 -d - IMAGE``; rootless, one pass (e2fsprogs >= 1.47.1). What mke2fs gets
    wrong is put right with one debugfs script afterwards: it keeps only the
    ``security.capability`` xattr (the others are set with ``ea_set``). A hardlinked inode
    takes the metadata of the last hardlink header, which the tar writer fills with the
    inode owner's, so nothing needs restoring there. Holes stay
    holes (mke2fs skips zero blocks), device nodes, FIFOs, setuid bits, mode-0000 files,
    hardlinked symlinks and uids above 2^31 are kept as they are; sub-second mtimes, which
    mke2fs truncates, are put back. Limits: atime/ctime are 0 (the tar carries none), and
    filling one directory is quadratic in its size (see :data:`STREAM_DIR_LIMIT`).
``mount``
    an empty filesystem is loop-mounted (``nosuid,nodev,noexec``) and ``write_dir`` applies the
    plan into the mount point; root only. Unmounted and detached on every path; what a run
    killed outright (SIGKILL) left mounted or attached is found by the next mount-method run
    and cleaned up (see mountstate.py). The kernel's journal and ctimes make it the one
    method whose bytes are not reproducible.
``dir``
    ``write_dir`` applies the plan into a private staging directory (0700, inside the work
    directory next to the output), then ``mke2fs -d DIR``; debugfs then sets the root's
    metadata, relinks hardlinked symlinks (mke2fs copies them apart) and fixes atime/ctime
    (taken from the staging tree). As non-root it also restores every owner, mode, device
    node and xattr, so only paths debugfs cannot name (a newline or another control
    character) are lost: warned about, and refused with ``--strict``.

Reproducibility: the UUID and directory hash seed are uuid5 of the identity (manifest digest)
and the options; every e2fsprogs tool runs with a fixed clock (``E2FSPROGS_FAKE_TIME``,
``E2FSCK_TIME``), our own mke2fs.conf and an explicit feature list, so the stream and dir
methods give byte-identical images for the same identity and options (``--shrink`` included),
and the direct method (its own layout, so other bytes) is reproducible the same way.
atime and ctime are the entry's mtime (whole seconds) in the direct and dir methods, 0 in
stream; crtime is the fixed clock in all three.

Sizing (sizing.py): content blocks and inodes from the plan, plus the filesystem's own overhead
measured by formatting an empty filesystem of the candidate size with the same options; then
headroom, 0% reserved blocks, 4 KiB blocks, size rounded up to the alignment (2 MiB).

The image is written to a temporary name next to ``request.output`` and renamed on success;
any failure (or cancel, or KeyboardInterrupt) removes it, the staging directory and any
mount / loop device.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from worker.cache.index import EntryKind, IndexEntry
from worker.errors import Canceled, ConfigError, PackagingError, RootfsExportError, ToolMissing
from worker.flatten.plan import FlatPlan
from worker.flatten.reader import BlobLocator
from worker.flatten.times import EXT4_RANGE, split_time
from worker.package.e2fs import (
    BLOCK_SIZE,
    FIXED_TIME,
    INODE_SIZE,
    debugfs_quote,
    debugfs_refusal,
    debugfs_script,
    e2fsprogs_version,
    find_tool,
    fsck_check,
    fsck_fix,
    resize,
    run_tool,
    superblock,
    tail,
    tar_stream_support,
    tool_env,
)
from worker.package.ext4fs.writer import (
    DirectSpec,
    unsupported_features,
    write_image,
    written_features,
)
from worker.package.features import mke2fs_option, resolve_features
from worker.package.loop import loop_available, loop_mounted
from worker.package.mountstate import image_name, mount_name, reap_stale
from worker.package.sizing import (
    ContentNeeds,
    align_up,
    content_needs,
    headroom_bytes,
    initial_fs_size,
    inode_count,
)
from worker.progress import Phase, ProgressCallback, ProgressEvent, no_progress
from worker.staging import sweep_stale, temp_prefix

if TYPE_CHECKING:
    # worker.export imports this module from build_output: keep the import one-way at runtime.
    from worker.export import ExportRequest, Ext4Method, Ext4Options
    from worker.settings import Settings

log = logging.getLogger(__name__)

#: bump when a change alters the bytes produced for the same input (part of the UUID seed)
FORMAT_VERSION = "rootfs-export-ext4/1"
#: libext2fs adds each entry to an unindexed directory by scanning it (twice: lookup, then a
#: free slot), so ``mke2fs -d`` fills one directory in quadratic time: 20,000 entries in one
#: directory take ~2 minutes on a fast machine, against ~4 s loop-mounted (kernel htree). Above
#: this many entries in one directory, auto prefers the mount method where it can run.
STREAM_DIR_LIMIT = 10_000
_NAMESPACE = uuid.UUID("6f3d1c2e-5b7a-4e8f-9a0b-1c2d3e4f5a6b")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: writes the flattened PAX tar of the plan (every directory before its children) to a
#: binary file object; must not close it. Called at most once, possibly in another thread.
TarWriter = Callable[[BinaryIO], None]

#: applies the plan into an existing, possibly non-empty directory (a mount point with
#: ``lost+found``, or an empty staging directory); the plan's ``"."`` entry sets the metadata of
#: that directory itself. Called at most once.
DirWriter = Callable[[Path], None]


@dataclass(frozen=True, slots=True)
class Ext4Build:
    """What :func:`build_ext4` made; ``build_output`` turns it into an ExportResult."""

    output: Path                   # the final image path (already renamed into place)
    output_size: int               # bytes of the image file (apparent size, aligned)
    sha256: str                    # of the image file
    method: Ext4Method             # the method actually used (never AUTO)
    fs_size: int                   # bytes of the filesystem (== output_size unless aligned up)
    block_size: int
    blocks: int
    inodes: int
    free_blocks: int
    free_inodes: int
    features: tuple[str, ...]
    label: str
    uuid: str
    timings: dict[str, float] = field(default_factory=dict)   # "package", "check", "shrink"
    warnings: tuple[str, ...] = ()
    e2fsprogs: str = ""            # version that made it (same version + input = same bytes)

    def extra(self) -> dict[str, Any]:
        """The ``ExportResult.extra`` part: method, fs size, inode count, features, ..."""
        return {
            "ext4_method": str(self.method),
            "fs_size": self.fs_size,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "inodes": self.inodes,
            "free_blocks": self.free_blocks,
            "free_inodes": self.free_inodes,
            "features": list(self.features),
            "label": self.label,
            "uuid": self.uuid,
            "e2fsprogs": self.e2fsprogs,
        }


def build_ext4(plan: FlatPlan, request: ExportRequest, settings: Settings, *,
               identity: str,
               write_tar: TarWriter,
               write_dir: DirWriter,
               progress: ProgressCallback = no_progress,
               cancel: threading.Event | None = None,
               locate: BlobLocator | None = None,
               on_layer_done: Callable[[int], None] | None = None) -> Ext4Build:
    """Build ``request.output`` as an ext4 image holding ``plan``; return what was made.

    ``identity`` is the manifest digest (for ``--add`` builds, the digest plus the add layer's
    diff_id): together with ``request.ext4`` it seeds the UUID and directory hash seed so that
    the same identity and options give a byte-identical image. ``write_tar`` / ``write_dir``
    are the flatten stage's writers bound to the plan and the blob cache; only the one the
    chosen method needs is called. The direct method reads the layers itself through
    ``locate`` (without it, direct is not available) and calls ``on_layer_done(i)`` once
    layer ``i`` will not be read again. ``request.adds`` must already be part of ``plan`` (see
    :func:`worker.package.adds.adds_layer`). The ``OUT.json`` sidecar is not written here:
    ``build_output`` writes it with :func:`worker.package.sidecar.write_sidecar` after it made
    the ExportResult. The returned warnings are the whole truth about what the image lacks:
    what ``write_dir`` could not do as non-root (owners, devices, xattrs) is restored in the
    image afterwards, so its own report's warnings do not apply to the image.
    Raises PackagingError / ToolMissing / Canceled; leaves nothing behind.
    """
    from worker.export import Ext4Method

    opts = request.ext4
    started = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(request.output).absolute()
    if request.output == "-":
        raise ConfigError("an ext4 image cannot be written to stdout; give a file with -o")
    if opts.size is not None and opts.shrink:
        raise ConfigError("--size and --shrink contradict each other: give one of them")
    features = resolve_features(opts.features)
    label = _check_label(opts.label)
    fraction = settings.ext4_headroom if opts.headroom is None else opts.headroom
    min_free = settings.ext4_min_free if opts.min_free is None else opts.min_free
    if fraction < 0 or min_free < 0:
        raise ConfigError("--headroom must not be negative")
    alignment = settings.ext4_alignment
    if alignment % BLOCK_SIZE:
        raise ConfigError(f"ROOTFS_EXPORT_EXT4_ALIGNMENT: {alignment} is not a multiple of "
                          f"{BLOCK_SIZE} (the block size)")
    _check_lost_found(plan)
    method, warnings = choose_method(plan, opts.method, strict=opts.strict, features=features,
                                     direct_ok=locate is not None)
    _check_cancel(cancel)
    if not out.parent.is_dir():
        raise PackagingError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.is_dir() and not out.is_symlink():
        raise PackagingError(f"cannot write the ext4 image to {out}: it is a directory")

    needs = content_needs(plan)
    free_target = headroom_bytes(needs, fraction, min_free)
    seed = _identity_seed(identity, opts, features, label, alignment, fraction, min_free)
    fs_uuid = str(uuid.uuid5(_NAMESPACE, "uuid:" + seed))
    hash_seed = str(uuid.uuid5(_NAMESPACE, "hash_seed:" + seed))

    # A private work directory next to the output: the temporary image (renamed into place on
    # success), sizing probes, the staging directory and the mount point all live in it.
    try:
        sweep_stale(out)
        work = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise PackagingError(f"cannot write {out}: {out.parent}: {exc.strerror or exc}") from exc
    # The mount method's backing file and mount point carry this process's pid and start
    # time in their names, so that a later run recognises them if we are killed (mountstate).
    image = work / (image_name() if method == Ext4Method.MOUNT else "image.ext4")
    try:
        progress(ProgressEvent(Phase.PACKAGE, message=f"sizing ext4 image ({method} method)"))
        fs_bytes, inodes = _choose_geometry(work, needs, free_target, opts.size, alignment,
                                            features)
        mkfs = _mke2fs_args(features, label, fs_uuid, hash_seed, inodes)
        _check_cancel(cancel)
        progress(ProgressEvent(Phase.PACKAGE, bytes_total=plan.data_bytes,
                               message=f"writing ext4 image ({method} method)"))
        t0 = time.monotonic()
        written: tuple[str, int] | None = None     # the direct method's (sha256, file size)
        if method == Ext4Method.DIRECT:
            assert locate is not None    # choose_method only picks direct with a locator
            written = _build_direct(plan, image, fs_bytes, inodes, features, label, fs_uuid,
                                    hash_seed, alignment, locate, progress, cancel,
                                    on_layer_done)
        elif method == Ext4Method.STREAM:
            _build_stream(mkfs, image, fs_bytes, write_tar, cancel)
            _debugfs_fixups(image, plan, xattrs="non-cap", root=False)
        elif method == Ext4Method.MOUNT:
            _build_mount(mkfs, image, fs_bytes, work, write_dir, cancel)
        else:
            _build_dir(mkfs, image, fs_bytes, work, write_dir, plan, cancel)
            # xattrs too: the staging directory's filesystem may refuse some (user.* on an
            # older tmpfs, trusted.* as non-root), mke2fs -d DIR copies only what it holds
            _debugfs_fixups(image, plan, xattrs="all", root=True,
                            symlink_links=True, times=True)
        timings["package"] = time.monotonic() - t0
        _check_cancel(cancel)

        progress(ProgressEvent(Phase.CHECK, message="checking the filesystem (e2fsck -fn)"))
        t0 = time.monotonic()
        fsck_check(image)
        timings["check"] = time.monotonic() - t0
        if opts.shrink:
            t0 = time.monotonic()
            fs_bytes = _shrink(image, free_target, alignment)
            timings["shrink"] = time.monotonic() - t0
        _check_cancel(cancel)

        sb = superblock(image)
        blocks = int(sb["Block count"])
        fs_bytes = blocks * BLOCK_SIZE
        file_bytes = align_up(fs_bytes, alignment)
        with open(image, "r+b") as f:
            f.truncate(file_bytes)
            os.fsync(f.fileno())
        t0 = time.monotonic()
        if written is not None and not opts.shrink and written[1] == file_bytes:
            digest = written[0]      # hashed while it was written; e2fsck -n changed nothing
        else:
            digest = _sha256_sparse(image)
        timings["sha256"] = time.monotonic() - t0
        os.chmod(image, 0o644)
        from worker.export import check_output_path
        check_output_path(str(out), directory=False)   # it may have changed since the start
        os.replace(image, out)
        timings["total"] = time.monotonic() - started
        progress(ProgressEvent(Phase.PACKAGE, bytes_done=plan.data_bytes,
                               bytes_total=plan.data_bytes, message=f"wrote {out}"))
        return Ext4Build(
            output=out, output_size=file_bytes, sha256=digest, method=method,
            fs_size=fs_bytes, block_size=int(sb["Block size"]), blocks=blocks,
            inodes=int(sb["Inode count"]), free_blocks=int(sb["Free blocks"]),
            free_inodes=int(sb["Free inodes"]),
            features=tuple(sb.get("Filesystem features", "").split()),
            label=label, uuid=sb.get("Filesystem UUID", fs_uuid),
            timings=timings, warnings=tuple(warnings),
            e2fsprogs=".".join(map(str, e2fsprogs_version())))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():   # e.g. a mount that refused to go away: say so, do not hide it
            log.error("could not remove work directory %s", work)


# -- method choice -----------------------------------------------------------------------------

def stream_blockers(plan: FlatPlan) -> list[str]:
    """Why the stream method cannot reproduce ``plan`` exactly (empty list: it can).

    ``mke2fs -d -`` keeps only the ``security.capability`` xattr; the others are set
    afterwards with debugfs, which addresses files by path on a line-based script: a path
    holding a newline or another control character cannot be written there. (Hardlinked
    inodes need nothing: every link header carries the inode owner's metadata.)
    """
    problems = []
    for planned in plan.entries:
        if planned.link_to is not None:
            continue
        names = [name for name, _ in planned.entry.xattrs if name != "security.capability"]
        problems += _xattr_blockers(planned.path, names)
    return problems


def _xattr_blockers(path: str, names: list[str]) -> list[str]:
    """Why debugfs cannot set the xattrs ``names`` on ``path`` (empty list: it can)."""
    if not names:
        return []
    if not debugfs_addressable(path):
        return [f"xattrs on {path!r} cannot be set by path with debugfs"]
    return [f"xattr {name!r} on {path!r} cannot be set with debugfs"
            for name in names if debugfs_refusal(name) is not None]


def dir_root_blockers(plan: FlatPlan) -> list[str]:
    """Why the dir method as root cannot finish ``plan`` with its debugfs script (empty: it
    can): hardlinked symlinks are relinked and xattrs set by path (:func:`_debugfs_fixups`)."""
    kinds = {p.path: p.entry.kind for p in plan.entries if p.link_to is None}
    problems = []
    for planned in plan.entries:
        owner = planned.link_to
        if owner is None:
            problems += _xattr_blockers(planned.path, [n for n, _ in planned.entry.xattrs])
        elif kinds.get(owner) == EntryKind.SYMLINK and not (
                debugfs_addressable(planned.path) and debugfs_addressable(owner)):
            problems.append(f"the hardlink {planned.path!r} to the symlink {owner!r} cannot be "
                            "made with debugfs")
    return problems


def debugfs_addressable(path: str) -> bool:
    """Whether debugfs can name ``/path`` in a script line (see
    :func:`~worker.package.e2fs.debugfs_refusal`, the one check every script argument passes)."""
    return debugfs_refusal("/" + path) is None


def _lossy_as_non_root(plan: FlatPlan) -> list[str]:
    """What the dir method cannot restore as non-root (see :func:`_restore_unprivileged`)."""
    bad = [p.path for p in plan.entries if not debugfs_addressable(p.path)
           or (p.link_to is not None and not debugfs_addressable(p.link_to))]
    if not bad:
        return []
    return [f"ownership, modes, devices and xattrs of {len(bad)} path(s) debugfs cannot "
            f"address (e.g. {bad[0]!r})"]


def largest_directory(plan: FlatPlan) -> tuple[str, int]:
    """The directory with the most entries in ``plan`` and that count."""
    counts: dict[str, int] = {}
    for planned in plan.entries:
        if planned.path != ".":
            parent = planned.path.rpartition("/")[0] or "."
            counts[parent] = counts.get(parent, 0) + 1
    if not counts:
        return ".", 0
    path = max(counts, key=lambda p: counts[p])
    return path, counts[path]


def choose_method(plan: FlatPlan, requested: Ext4Method, *, strict: bool = False,
                  features: tuple[str, ...] | None = None,
                  direct_ok: bool = True) -> tuple[Ext4Method, list[str]]:
    """The method to use for ``plan`` and any warnings; errors if a forced one cannot run.

    Auto: ``direct`` for every feature set it writes (the ``default`` and ``compat``
    profiles) when the layer blobs are at hand (``direct_ok``); otherwise
    ``stream`` where ``mke2fs -d -`` works and can reproduce the plan (and no directory
    holds more than :data:`STREAM_DIR_LIMIT` entries where the mount method can run), else
    ``mount`` as root with loop devices, else ``dir``. As non-root the dir method restores ownership, modes,
    device nodes and xattrs with debugfs after ``mke2fs -d``; only paths debugfs cannot name
    are lost, which is warned about (refused with ``strict``).
    """
    from worker.export import Ext4Method

    warnings: list[str] = []
    if requested == Ext4Method.DIRECT:
        missing = unsupported_features(features or ())
        if missing:
            raise ConfigError("--ext4-method direct cannot write the requested ext4 features: "
                              + ", ".join(missing) + " (use --ext4-features default or compat, "
                              "or another --ext4-method)")
        if not direct_ok:
            raise ConfigError("--ext4-method direct needs the layer blobs (not given here)")
        return Ext4Method.DIRECT, warnings
    stream_ok, stream_why = tar_stream_support()
    blockers = stream_blockers(plan) if stream_ok else []
    loop_ok, loop_why = loop_available()
    if requested == Ext4Method.STREAM:
        if not stream_ok:
            raise ToolMissing(f"--ext4-method stream is not available: {stream_why}")
        if blockers:
            raise PackagingError("--ext4-method stream cannot reproduce this image: "
                                 + "; ".join(blockers[:5]))
        return Ext4Method.STREAM, warnings
    if requested == Ext4Method.MOUNT:
        if not loop_ok:
            raise PackagingError(f"--ext4-method mount is not available: {loop_why}")
        return Ext4Method.MOUNT, warnings
    # As root the dir method ends with a debugfs script that must name every hardlinked symlink
    # and every file with xattrs; where it cannot, only the mount method is exact.
    dir_blockers = dir_root_blockers(plan) if os.geteuid() == 0 else []
    if requested == Ext4Method.AUTO:
        if direct_ok and features is not None and not unsupported_features(features):
            return Ext4Method.DIRECT, warnings
        big_dir, big_count = largest_directory(plan)
        if stream_ok and not blockers and (big_count <= STREAM_DIR_LIMIT or not loop_ok):
            if big_count > STREAM_DIR_LIMIT:
                log.warning("directory /%s has %d entries: mke2fs -d - fills it in quadratic "
                            "time (expect minutes); the mount method (root) is much faster",
                            big_dir, big_count)
            return Ext4Method.STREAM, warnings
        if loop_ok:
            if stream_ok and not blockers:
                log.info("using the mount method: directory /%s has %d entries, more than "
                         "mke2fs -d fills in reasonable time (%d)", big_dir, big_count,
                         STREAM_DIR_LIMIT)
            return Ext4Method.MOUNT, warnings
    if dir_blockers:
        hint = ("use --ext4-method mount" if loop_ok
                else f"the mount method is not available either: {loop_why}")
        raise PackagingError(f"the {'dir' if requested == Ext4Method.DIR else 'stream and dir'} "
                             "method cannot reproduce this image ("
                             + "; ".join(dir_blockers[:5]) + f"); {hint}")
    if os.geteuid() != 0:
        lost = _lossy_as_non_root(plan)
        if lost:
            why = ("the dir method as non-root cannot keep " + ", ".join(lost)
                   + (f" (stream method unavailable: {stream_why})" if not stream_ok else ""))
            if strict:
                raise PackagingError(f"refusing a lossy build (--strict): {why}")
            warnings.append(why)
            log.warning("%s", why)
    return Ext4Method.DIR, warnings


def _check_lost_found(plan: FlatPlan) -> None:
    """ext4 needs ``/lost+found`` to be a directory (mke2fs creates it, e2fsck relies on it)."""
    from worker.cache.index import EntryKind

    for planned in plan.entries:
        if planned.path == "lost+found" and (planned.link_to is not None
                                             or planned.entry.kind != EntryKind.DIR):
            raise PackagingError(
                f"the image has /lost+found as a {planned.kind}, not a directory: an ext4 "
                "root filesystem needs /lost+found to be a directory (use --format tar or dir "
                "for this image)")


# -- geometry ------------------------------------------------------------------------------------

def _check_label(label: str) -> str:
    if len(label.encode()) > 16:
        raise ConfigError(f"--label {label!r} is longer than ext4's 16 bytes")
    return label


def _identity_seed(identity: str, opts: Ext4Options, features: tuple[str, ...], label: str,
                   alignment: int, fraction: float, min_free: int) -> str:
    return json.dumps({
        "format": FORMAT_VERSION, "identity": identity, "features": list(features),
        "label": label, "size": opts.size, "headroom": fraction, "min_free": min_free,
        "shrink": opts.shrink, "alignment": alignment,
    }, sort_keys=True)


def _mke2fs_args(features: tuple[str, ...], label: str, fs_uuid: str, hash_seed: str,
                 inodes: int) -> list[str]:
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE),
            "-m", "0", "-N", str(inodes), "-O", mke2fs_option(features), "-L", label,
            "-U", fs_uuid,
            "-E", f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0"]


def _probe(work: Path, fs_bytes: int, features: tuple[str, ...], inodes: int) -> dict[str, str]:
    """Format an empty filesystem of ``fs_bytes`` with our options; return its superblock."""
    probe = work / "probe.ext4"
    try:
        args = _mke2fs_args(features, "probe", str(uuid.UUID(int=0)), str(uuid.UUID(int=0)),
                            inodes)
        args[-1] = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
        run_tool([*args, str(probe), str(fs_bytes // 1024) + "k"], what="mke2fs (sizing probe)",
                 timeout=600)
        return superblock(probe)
    finally:
        probe.unlink(missing_ok=True)


def _choose_geometry(work: Path, needs: ContentNeeds, free_target: int, size: int | None,
                     alignment: int, features: tuple[str, ...]) -> tuple[int, int]:
    """(filesystem bytes, inode count) that hold ``needs`` plus ``free_target`` bytes free."""
    if size is not None:
        fs_bytes = align_up(size, alignment)
        spare = max(0, fs_bytes - needs.bytes)
        inodes = needs.inodes + max(1024, needs.inodes // 4) + spare // (64 << 10)
        try:
            free_blocks = int(_probe(work, fs_bytes, features, inodes)["Free blocks"])
        except PackagingError:
            free_blocks = -1     # cannot even hold the inode tables
        if free_blocks < needs.blocks:
            left = (f"leaves {_human(free_blocks * BLOCK_SIZE)} for it after its own metadata"
                    if free_blocks >= 0 else f"cannot even hold {inodes} inodes")
            minimum = _min_size(work, needs, features, alignment)
            raise PackagingError(
                f"--size {_human(size)} is too small for this image: its content needs about "
                f"{_human(needs.bytes)} ({needs.inodes} inodes) and a {_human(fs_bytes)} "
                f"filesystem {left}; use at least --size {_human(minimum)} or leave --size out "
                "to size it automatically")
        return fs_bytes, inodes
    inodes = inode_count(needs, free_target)
    fs_bytes = initial_fs_size(needs, inodes, free_target, alignment)
    need_blocks = needs.blocks + -(-free_target // BLOCK_SIZE)
    for _ in range(10):
        sb = _probe(work, fs_bytes, features, inodes)
        free_blocks = int(sb["Free blocks"])
        if free_blocks >= need_blocks:
            return fs_bytes, inodes
        fs_bytes = align_up(fs_bytes + (need_blocks - free_blocks) * BLOCK_SIZE, alignment)
    raise PackagingError(f"could not size an ext4 image for {_human(needs.bytes)} of content")


def _min_size(work: Path, needs: ContentNeeds, features: tuple[str, ...], alignment: int) -> int:
    inodes = needs.inodes + max(1024, needs.inodes // 4)
    fs_bytes = initial_fs_size(needs, inodes, 0, alignment)
    for _ in range(10):
        try:
            free_blocks = int(_probe(work, fs_bytes, features, inodes)["Free blocks"])
        except PackagingError:
            free_blocks = 0
        if free_blocks >= needs.blocks:
            return fs_bytes
        fs_bytes = align_up(fs_bytes + max(needs.blocks - free_blocks, 1) * BLOCK_SIZE,
                            alignment)
    return fs_bytes


def _human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"


# -- the methods ---------------------------------------------------------------------------------

def _build_direct(plan: FlatPlan, image: Path, fs_bytes: int, inodes: int,
                  features: tuple[str, ...], label: str, fs_uuid: str, hash_seed: str,
                  alignment: int, locate: BlobLocator, progress: ProgressCallback,
                  cancel: threading.Event | None,
                  on_layer_done: Callable[[int], None] | None) -> tuple[str, int]:
    """The plan written straight into the image file by our own ext4 writer (ext4fs/);
    returns the sha256 and size of the file it wrote (already aligned)."""
    spec = DirectSpec(blocks=fs_bytes // BLOCK_SIZE, inodes=inodes,
                      features=written_features(features), label=label.encode(),
                      uuid=uuid.UUID(fs_uuid).bytes, hash_seed=uuid.UUID(hash_seed).bytes,
                      fixed_time=FIXED_TIME)
    report = write_image(plan, image, spec, locate, alignment=alignment, progress=progress,
                         cancel=cancel, on_layer_done=on_layer_done)
    return report.sha256, report.file_size


def _build_stream(mkfs: list[str], image: Path, fs_bytes: int, write_tar: TarWriter,
                  cancel: threading.Event | None) -> None:
    """``write_tar`` in a thread -> pipe -> ``mke2fs -d -``; either side failing stops both."""
    argv = [find_tool(mkfs[0]), *mkfs[1:], "-d", "-", str(image), f"{fs_bytes // 1024}k"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=tool_env())
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(OSError):   # a bigger pipe: fewer context switches
        fcntl.fcntl(proc.stdin.fileno(), F_SETPIPE_SZ, 1 << 20)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()),  # type: ignore[union-attr]
                              name="mke2fs-output", daemon=True)
    reader.start()
    writer_error: list[BaseException] = []
    stdin = proc.stdin

    def feed() -> None:
        try:
            # the writer reports its own progress (bytes read from the layers)
            write_tar(cast(BinaryIO, stdin))
        except BaseException as exc:   # noqa: BLE001 - handed to the main thread
            writer_error.append(exc)
            with contextlib.suppress(OSError):
                proc.kill()
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    writer = threading.Thread(target=feed, name="tar-writer", daemon=True)
    writer.start()
    try:
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    proc.kill()
        writer.join(timeout=60)
        if writer.is_alive():
            raise PackagingError("the tar writer did not stop after mke2fs exited")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        writer.join(timeout=10)
        reader.join(timeout=10)
    _check_cancel(cancel)
    text = b"".join(output).decode(errors="replace")
    failure = writer_error[0] if writer_error else None
    if failure is not None and not isinstance(failure, BrokenPipeError):
        if isinstance(failure, RootfsExportError):
            raise failure
        raise PackagingError(f"writing the flattened tar into mke2fs failed: {failure!r}"
                             + (f"\nmke2fs said:\n{tail(text)}" if text.strip() else "")
                             ) from failure
    if proc.returncode != 0:
        if "Could not allocate" in text or "No space left" in text:
            raise PackagingError(f"the ext4 image ({_human(fs_bytes)}) is too small for this "
                                 f"image's content; mke2fs said:\n{tail(text)}")
        raise PackagingError(f"mke2fs -d - failed (exit {proc.returncode}):\n{tail(text)}")
    if failure is not None:   # a broken pipe although mke2fs succeeded: it stopped reading
        raise PackagingError(f"mke2fs stopped reading the tar stream early:\n{tail(text)}")


_TYPE_BITS = {"file": 0o100000, "dir": 0o040000, "symlink": 0o120000, "char": 0o020000,
              "block": 0o060000, "fifo": 0o010000}


def _metadata_commands(target: str, entry: IndexEntry) -> list[str]:
    quoted = debugfs_quote(target)
    mode = _TYPE_BITS.get(str(entry.kind), 0) | (entry.mode & 0o7777)
    return [f"sif {quoted} mode 0{mode:o}", f"sif {quoted} uid {entry.uid}",
            f"sif {quoted} gid {entry.gid}", f"sif {quoted} mtime @{_split_time(entry.mtime)[0]}"]


def _split_time(mtime: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of an mtime within what ext4 holds."""
    return split_time(mtime, EXT4_RANGE)


def _time_commands(target: str, entry: IndexEntry) -> list[str]:
    quoted = debugfs_quote(target)
    seconds = _split_time(entry.mtime)[0]
    return [f"sif {quoted} atime @{seconds}", f"sif {quoted} ctime @{seconds}"]


def _subsecond_commands(target: str, entry: IndexEntry) -> list[str]:
    """``mke2fs -d`` stores whole seconds in the 32-bit field alone: put back the nanoseconds
    (``i_mtime_extra`` holds them shifted left by 2 above the two epoch bits that extend the
    32-bit seconds), and the seconds too where mke2fs got them wrong: it truncates negative
    fractions towards zero and clamps times outside the signed 32-bit range."""
    seconds, ns = _split_time(entry.mtime)
    low = (seconds + (1 << 31)) % (1 << 32) - (1 << 31)
    clamped = not EXT4_RANGE[0] <= entry.mtime <= EXT4_RANGE[1]   # NaN: compares False
    if not ns and low == seconds and not (clamped and entry.mtime == entry.mtime):
        return []
    epoch = ((seconds - low) >> 32) & 3
    quoted = debugfs_quote(target)
    # the 32-bit field as unsigned (debugfs parses no negative times); the epoch bits set
    # right after it decide what it means
    return [f"sif {quoted} mtime @{low & 0xFFFFFFFF}",
            f"sif {quoted} mtime_extra {(ns << 2) | epoch}"]


def _debugfs_fixups(image: Path, plan: FlatPlan, *, xattrs: str,
                    root: bool, symlink_links: bool = False, times: bool = False,
                    subsecond: bool = True) -> None:
    """Put back, with one debugfs script, what ``mke2fs -d`` gets wrong or drops.

    ``xattrs``: ``"non-cap"``: ``mke2fs -d -`` keeps only security.capability, set the others;
    ``"all"``: set every xattr (``""``: none).
    ``root``: ``mke2fs -d DIR`` does not copy the source directory's own metadata to the root.
    ``symlink_links``: ``mke2fs -d DIR`` copies hardlinked symlinks as separate inodes; relink.
    ``times``: ``mke2fs -d DIR`` copies the staging tree's atime and ctime (the time of the
    build); set both to the entry's mtime so the same input gives the same bytes.
    ``subsecond``: ``mke2fs -d`` (both forms) drops the nanoseconds of mtimes; restore them.
    """
    commands: list[str] = []
    if symlink_links:
        kinds = {p.path: p.entry.kind for p in plan.entries if p.link_to is None}
        names: dict[str, int] = {}
        for planned in plan.entries:
            owner = planned.link_to
            if owner is not None and kinds.get(owner) == EntryKind.SYMLINK:
                path = debugfs_quote("/" + planned.path)
                if times:   # the freed duplicate inode keeps its times: make them fixed too
                    commands += _time_commands("/" + planned.path, planned.entry)
                commands += [f"rm {path}", f"ln {debugfs_quote('/' + owner)} {path}"]
                names[owner] = names.get(owner, 1) + 1
        commands += [f"sif {debugfs_quote('/' + owner)} links_count {n}"
                     for owner, n in names.items()]
    values: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rootfs-export-fixup-") as tmp:
        for planned in plan.entries:
            if planned.link_to is not None:
                continue
            target = "/" if planned.path == "." else "/" + planned.path
            if root and planned.path == ".":
                commands.extend(_metadata_commands(target, planned.entry))
            if times and debugfs_addressable(planned.path):
                commands.extend(_time_commands(target, planned.entry))
            if subsecond and debugfs_addressable(planned.path):
                commands.extend(_subsecond_commands(target, planned.entry))
            if not xattrs:
                continue
            for name, value in planned.entry.xattrs:
                if name == "security.capability" and xattrs != "all":
                    continue
                vfile = os.path.join(tmp, str(len(values)))
                with open(vfile, "wb") as f:
                    f.write(value)
                values.append(vfile)
                commands.append(f"ea_set -f {debugfs_quote(vfile)} {debugfs_quote(target)} "
                                f"{debugfs_quote(name)}")
        if commands:
            debugfs_script(image, commands, write=True)


def _build_mount(mkfs: list[str], image: Path, fs_bytes: int, work: Path, write_dir: DirWriter,
                 cancel: threading.Event | None) -> None:
    # What a killed run left mounted (no cleanup runs on SIGKILL) is undone first.
    reap_stale()
    run_tool([*mkfs, str(image), f"{fs_bytes // 1024}k"], what="mke2fs", timeout=3600)
    mnt = work / mount_name()
    mnt.mkdir(mode=0o700)
    with loop_mounted(image, mnt, work=work):
        _check_cancel(cancel)
        write_dir(mnt)
        _check_cancel(cancel)
    # The mount left the build host's temp path, its clock and a mount count in the superblock.
    debugfs_script(image, ['ssv last_mounted ""', "ssv mtime 0", "ssv mnt_count 0",
                           f"ssv wtime @{FIXED_TIME}"], write=True)


def _build_dir(mkfs: list[str], image: Path, fs_bytes: int, work: Path, write_dir: DirWriter,
               plan: FlatPlan, cancel: threading.Event | None) -> None:
    staging = work / "rootfs"
    staging.mkdir(mode=0o700)
    write_dir(staging)
    _check_cancel(cancel)
    unprivileged = os.geteuid() != 0
    missing: set[str] = set()
    if unprivileged:
        missing = _prepare_unprivileged_staging(staging, plan)
    res = run_tool([*mkfs, "-d", str(staging), str(image), f"{fs_bytes // 1024}k"],
                   what="mke2fs -d DIR", timeout=3600, check=False)
    if res.returncode != 0:
        text = res.stdout + res.stderr
        if "Could not allocate" in text or "No space left" in text:
            raise PackagingError(f"the ext4 image ({_human(fs_bytes)}) is too small for this "
                                 f"image's content; mke2fs said:\n{tail(text)}")
        raise PackagingError(f"mke2fs -d {staging} failed (exit {res.returncode}):\n{tail(text)}")
    _check_cancel(cancel)
    if unprivileged:
        _restore_unprivileged(image, plan, missing)


def _prepare_unprivileged_staging(staging: Path, plan: FlatPlan) -> set[str]:
    """Make the staged tree readable for ``mke2fs -d`` (mode 0000 files, 0500 dirs); return
    the special files a non-root writer could not create. Modes are restored afterwards."""
    from worker.cache.index import EntryKind

    missing = set()
    for planned in plan.entries:
        if planned.link_to is None and planned.entry.kind in (
                EntryKind.CHAR, EntryKind.BLOCK, EntryKind.FIFO) \
                and not os.path.lexists(staging / planned.path):
            missing.add(planned.path)
    for dirpath, dirnames, filenames in os.walk(staging):
        os.chmod(dirpath, (os.stat(dirpath).st_mode & 0o7777) | 0o700)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o400:
                os.chmod(full, (st.st_mode & 0o7777) | 0o400)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, (os.lstat(full).st_mode & 0o7777) | 0o700)
    return missing


def _restore_unprivileged(image: Path, plan: FlatPlan, missing: set[str]) -> None:
    """After a non-root ``mke2fs -d DIR``: set every inode's mode, owner and mtime, create the
    device nodes the writer could not, relink their hardlinks, and set every xattr."""
    from worker.cache.index import EntryKind

    commands: list[str] = []
    links: list[str] = []
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="rootfs-export-restore-") as tmp:
        for planned in plan.entries:
            # what debugfs cannot name is lost (warned about, refused with --strict)
            if not debugfs_addressable(planned.path) or (
                    planned.link_to is not None and not debugfs_addressable(planned.link_to)):
                continue
            target = "/" if planned.path == "." else "/" + planned.path
            quoted = debugfs_quote(target)
            if planned.link_to is not None:
                if planned.link_to in missing:
                    links.append(f"ln {debugfs_quote('/' + planned.link_to)} {quoted}")
                    counts[planned.link_to] = counts.get(planned.link_to, 1) + 1
                continue
            e = planned.entry
            if planned.path in missing:
                # debugfs mknod takes a name in the current directory, not a path
                parent, _, name = planned.path.rpartition("/")
                spec = "p" if e.kind == EntryKind.FIFO else \
                    f"{'c' if e.kind == EntryKind.CHAR else 'b'} {e.devmajor} {e.devminor}"
                commands += [f"cd {debugfs_quote('/' + parent)}",
                             f"mknod {debugfs_quote(name)} {spec}", "cd /"]
            commands.extend(_metadata_commands(target, e))
            commands.extend(_time_commands(target, e))
            commands.extend(_subsecond_commands(target, e))
            for i, (name, value) in enumerate(e.xattrs):
                vfile = os.path.join(tmp, f"{len(commands)}-{i}")
                with open(vfile, "wb") as f:
                    f.write(value)
                commands.append(f"ea_set -f {debugfs_quote(vfile)} {quoted} "
                                f"{debugfs_quote(name)}")
        commands += links
        commands += [f"sif {debugfs_quote('/' + owner)} links_count {n}"
                     for owner, n in counts.items()]
        if commands:
            debugfs_script(image, commands, write=True)


def _shrink(image: Path, free_target: int, alignment: int) -> int:
    """``e2fsck -f -y``, ``resize2fs -M``, then grow back by ``free_target``; new fs bytes."""
    fsck_fix(image)
    resize(image)
    minimal = int(superblock(image)["Block count"]) * BLOCK_SIZE
    target = align_up(minimal + free_target, alignment)
    if target != minimal:
        with open(image, "r+b") as f:
            f.truncate(max(target, os.path.getsize(image)))
        resize(image, target // BLOCK_SIZE)
    with open(image, "r+b") as f:
        f.truncate(target)
    fsck_check(image)
    return target


def _sha256_sparse(path: Path) -> str:
    """sha256 of a (sparse) file, feeding holes as zeros without reading them from disk."""
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:   # ENXIO: only a hole remains
                data_at = size
            while pos < data_at:
                n = min(len(zeros), data_at - pos)
                h.update(zeros[:n] if n < len(zeros) else zeros)
                pos += n
            if pos >= size:
                break
            hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
            f.seek(pos)
            while pos < hole_at:
                chunk = f.read(min(1 << 20, hole_at - pos))
                if not chunk:
                    raise PackagingError(f"{path} shrank while hashing it")
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Canceled("export canceled; the partial image was removed")
