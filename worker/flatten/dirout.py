"""Write a plan into a directory, never touching anything outside it.

Every write goes through directory file descriptors opened one component at a time with
``O_DIRECTORY | O_NOFOLLOW`` from the target's own descriptor, and every node is created with
``*at`` calls (``mkdirat``, ``symlinkat``, ``mknodat``, ``linkat``, ``openat`` with
``O_CREAT | O_EXCL | O_NOFOLLOW``); metadata is set on descriptors or with
``follow_symlinks=False``. A symlink written by the image can therefore never redirect a later
write, whatever it points at: the plan's paths are canonical, and should anything on disk
disagree (a symlink where a directory should be), the walk fails instead of following it.

Directories are created owner-writable and get their real mode, owner, xattrs and mtime last,
deepest first, so read-only directories still receive their children and mtimes are not
disturbed by later writes. As root everything is kept; otherwise ownership, device nodes and
privileged xattrs are counted and reported in one warning instead of failing the job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.cache.index import EntryKind, IndexEntry
from worker.errors import Canceled, PackagingError, UnsafeLayerEntry
from worker.flatten.plan import FlatPlan, PlannedEntry
from worker.flatten.reader import BlobLocator, LayerStream, open_layer
from worker.flatten.tarout import sparse_map
from worker.flatten.times import to_ns
from worker.progress import Phase, ProgressCallback, ProgressEvent, no_progress
from worker.staging import sweep_stale, temp_prefix

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PERM_ERRORS = (errno.EPERM, errno.EACCES)
_XATTR_ERRORS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclass(slots=True)
class DirReport:
    """What :func:`apply_plan` did; ``not_preserved`` counts what a non-root run lost."""

    entries: int = 0
    data_bytes: int = 0
    layers_read: int = 0
    not_preserved: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lost(self, what: str) -> None:
        self.not_preserved[what] = self.not_preserved.get(what, 0) + 1


def _split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition("/")
    return head or ".", tail


class _Dirs:
    """Directory descriptors by canonical path, opened component by component (LRU)."""

    def __init__(self, root_fd: int, size: int = 256) -> None:
        self.root_fd = root_fd
        self.size = size
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int:
        if path == ".":
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        # Start from the deepest ancestor already open (iteratively: trees can be deep).
        comps = path.split("/")
        start, cur = 0, self.root_fd
        for i in range(len(comps) - 1, 0, -1):
            anc = self._fds.get("/".join(comps[:i]))
            if anc is not None:
                start, cur = i, anc
                break
        for i in range(start, len(comps)):
            try:
                nfd = os.open(comps[i], _DIR_FLAGS, dir_fd=cur)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeLayerEntry("is not a directory in the output (a symlink or "
                                           "file appeared where the plan has a directory); "
                                           "refusing to follow it",
                                           path="/".join(comps[:i + 1])) from None
                raise
            self._fds["/".join(comps[:i + 1])] = nfd
            cur = nfd
        while len(self._fds) > self.size:     # the fd just opened is the newest: kept
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return cur

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Applier:
    def __init__(self, plan: FlatPlan, root_fd: int, locate: BlobLocator,
                 progress: ProgressCallback, cancel: threading.Event | None) -> None:
        self.plan = plan
        self.dirs = _Dirs(root_fd)
        self.locate = locate
        self.progress = progress
        self.cancel = cancel
        self.report = DirReport()
        self.root = os.geteuid() == 0
        self.skipped: set[str] = set()    # paths not created (device nodes, non-root)
        self.done = 0
        self._last = 0
        self.current = "."               # the path being written (for error messages)

    # -- metadata ----------------------------------------------------------------------------
    def _chown(self, target: int | str, e: IndexEntry, dir_fd: int | None = None) -> None:
        try:
            if isinstance(target, int):
                os.fchown(target, e.uid, e.gid)
            else:
                os.chown(target, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _PERM_ERRORS and exc.errno != errno.EINVAL:
                raise
            self.report.lost("ownership")

    def _xattrs(self, target: int | str, e: IndexEntry) -> None:
        for key, value in e.xattrs:
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _XATTR_ERRORS:
                    raise
                self.report.lost("xattrs")

    def _fd_meta(self, fd: int, e: IndexEntry) -> None:
        self._chown(fd, e)
        os.fchmod(fd, e.mode & 0o7777)
        self._xattrs(fd, e)
        os.utime(fd, ns=(to_ns(e.mtime), to_ns(e.mtime)))

    def _name_meta(self, dfd: int, name: str, e: IndexEntry, *, symlink: bool) -> None:
        self._chown(name, e, dir_fd=dfd)
        if not symlink:
            # just created by us as a device or FIFO in our own directory: not a symlink
            os.chmod(name, e.mode & 0o7777, dir_fd=dfd)
        if e.xattrs:
            # setxattr has no *at form: go through the directory descriptor's /proc link; the
            # last component is not followed (lsetxattr).
            self._xattrs(f"/proc/self/fd/{dfd}/{name}", e)
        os.utime(name, ns=(to_ns(e.mtime), to_ns(e.mtime)), dir_fd=dfd, follow_symlinks=False)

    # -- nodes -------------------------------------------------------------------------------
    def mkdir(self, pe: PlannedEntry) -> None:
        parent, name = _split(pe.path)
        dfd = self.dirs.get(parent)
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise PackagingError(f"{pe.path!r} already exists in the target and is not a "
                                     "directory") from None
            # an existing directory (lost+found of a fresh filesystem): make sure we can write
            fd = self.dirs.get(pe.path)
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)

    def node(self, pe: PlannedEntry) -> None:
        e = pe.entry
        parent, name = _split(pe.path)
        dfd = self.dirs.get(parent)
        if e.kind == EntryKind.SYMLINK:
            os.symlink(e.linkname, name, dir_fd=dfd)
            self._name_meta(dfd, name, e, symlink=True)
            return
        if e.kind in (EntryKind.CHAR, EntryKind.BLOCK, EntryKind.FIFO):
            if e.kind == EntryKind.FIFO:
                os.mkfifo(name, 0o600, dir_fd=dfd)
            else:
                fmt = stat.S_IFCHR if e.kind == EntryKind.CHAR else stat.S_IFBLK
                try:
                    os.mknod(name, fmt | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=dfd)
                except OSError as exc:
                    if exc.errno not in _PERM_ERRORS:
                        raise
                    self.report.lost("devices")
                    self.skipped.add(pe.path)
                    return
            self._name_meta(dfd, name, e, symlink=False)
            return
        if e.kind == EntryKind.FILE:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dfd)
            try:
                if e.size:
                    os.ftruncate(fd, e.size)
                self._fd_meta(fd, e)
            finally:
                os.close(fd)
            return
        raise PackagingError(f"cannot create {pe.path!r}: unexpected kind {e.kind}")

    def file_with_data(self, pe: PlannedEntry, stream: LayerStream) -> None:
        e = pe.entry
        parent, name = _split(pe.path)
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=self.dirs.get(parent))
        try:
            stream.skip_to(e.data_offset)
            if e.sparse is None:
                for piece in stream.read(e.data_size):
                    self._write_all(fd, piece)
            else:
                for off, n in sparse_map(e):
                    pos = off
                    for piece in stream.read(n):
                        view = piece
                        while len(view):
                            k = os.pwrite(fd, view, pos)
                            view = view[k:]
                            pos += k
                os.ftruncate(fd, e.size)
            self.done += e.data_size
            self.report.data_bytes += e.data_size
            self._fd_meta(fd, e)
        finally:
            os.close(fd)

    @staticmethod
    def _write_all(fd: int, piece: memoryview) -> None:
        while len(piece):
            k = os.write(fd, piece)
            piece = piece[k:]

    def link(self, pe: PlannedEntry) -> None:
        assert pe.link_to is not None
        if pe.link_to in self.skipped:
            self.report.lost("devices")
            return
        sparent, sname = _split(pe.link_to)
        dparent, dname = _split(pe.path)
        sfd = os.dup(self.dirs.get(sparent))
        try:
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=self.dirs.get(dparent),
                    follow_symlinks=False)
        finally:
            os.close(sfd)

    def dir_meta(self, pe: PlannedEntry) -> None:
        fd = self.dirs.get(pe.path)
        self._fd_meta(fd, pe.entry)

    # -- driver ------------------------------------------------------------------------------
    def emit(self, message: str, layers_done: int, force: bool = False) -> None:
        if force or self.done - self._last >= 64 << 20:
            self._last = self.done
            self.progress(ProgressEvent(phase=Phase.APPLY, bytes_done=self.done,
                                        bytes_total=self.plan.data_bytes,
                                        layers_done=layers_done,
                                        layers_total=len(self.plan.layers), message=message))

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Canceled("export canceled")

    def run(self, on_layer_done: Callable[[int], None] | None) -> DirReport:
        plan = self.plan
        self.emit("creating directories", 0, force=True)
        dirs: list[PlannedEntry] = []
        for pe in plan.entries:
            if pe.link_to is not None or pe.has_data:
                continue
            if pe.entry.kind == EntryKind.DIR:
                if pe.path != ".":
                    self.current = pe.path
                    self.mkdir(pe)
                dirs.append(pe)
            else:
                self.current = pe.path
                self.node(pe)
            self.report.entries += 1
        data_layers = plan.data_layers()
        for i, layer in enumerate(plan.layers):
            self.check()
            todo = data_layers.get(i)
            if todo:
                stream = open_layer(self.locate, layer, cancel=self.cancel)
                try:
                    for pe in todo:
                        self.current = pe.path
                        self.file_with_data(pe, stream)
                        self.report.entries += 1
                        self.emit(f"layer {i + 1}/{len(plan.layers)}", i)
                finally:
                    stream.close()
                self.report.layers_read += 1
            if on_layer_done is not None:
                on_layer_done(i)
            self.emit(f"layer {i + 1}/{len(plan.layers)} applied", i + 1, force=True)
        self.check()
        for pe in plan.entries:
            if pe.link_to is not None:
                self.current = pe.path
                self.link(pe)
                self.report.entries += 1
        for pe in reversed(dirs):
            self.current = pe.path
            self.dir_meta(pe)
        if self.report.not_preserved:
            lost = ", ".join(f"{what}: {n}" for what, n in sorted(self.report.not_preserved.items()))
            who = "not running as root" if not self.root else "the target filesystem refused"
            self.report.warnings.append(f"{who}: some metadata could not be preserved ({lost})")
        return self.report


def apply_plan(plan: FlatPlan, target: str | Path, locate: BlobLocator, *,
               progress: ProgressCallback = no_progress,
               cancel: threading.Event | None = None,
               on_layer_done: Callable[[int], None] | None = None) -> DirReport:
    """Apply ``plan`` into the existing directory ``target`` (empty, or a fresh mount point).

    The plan's ``"."`` entry sets the metadata of ``target`` itself. ``locate`` maps a layer to
    its cached blob; ``on_layer_done(i)`` is called as soon as layer ``i`` will not be read
    again. Raises Canceled (checked between layers and while reading), CorruptLayer,
    UnsafeLayerEntry, PackagingError, OSError; cleaning up is the caller's job.
    """
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    applier = _Applier(plan, root_fd, locate, progress, cancel)
    try:
        return applier.run(on_layer_done)
    except OSError as exc:
        # ENOSPC, ENAMETOOLONG (a name over 255 bytes), EDQUOT...: the user's problem to fix,
        # said with the path, not a traceback.
        raise PackagingError(f"cannot write {applier.current!r} into {str(target)!r}: "
                             f"{exc.strerror or exc}") from exc
    finally:
        applier.dirs.close()
        os.close(root_fd)


def remove_tree(path: str | Path) -> None:
    """Remove a (partial) output tree: read-only directories included, symlinks never
    followed, iteratively through directory descriptors (image trees can be deeper than
    Python's recursion limit and than PATH_MAX)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    stack: list[tuple[int, str]] = [(os.open(path, _DIR_FLAGS), "")]
    try:
        while stack:
            fd = stack[-1][0]
            child: tuple[int, str] | None = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        # a directory (not a symlink): make it ours to empty, then go down
                        with contextlib.suppress(OSError):
                            os.chmod(entry.name, 0o700, dir_fd=fd)
                        child = (os.open(entry.name, _DIR_FLAGS, dir_fd=fd), entry.name)
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                stack.append(child)
                continue
            _, name = stack.pop()
            os.close(fd)
            if stack:
                os.rmdir(name, dir_fd=stack[-1][0])
    finally:
        for fd, _ in stack:
            os.close(fd)
    os.rmdir(path)


def write_dir(plan: FlatPlan, output: str | Path, locate: BlobLocator, *,
              progress: ProgressCallback = no_progress,
              cancel: threading.Event | None = None,
              on_layer_done: Callable[[int], None] | None = None,
              strict: bool = False) -> DirReport:
    """Write ``plan`` as the directory ``output``: built under a temp name beside it, renamed
    into place only on success (an existing ``output`` must be an empty directory); on any
    failure the partial tree is removed. With ``strict``, losing any metadata (ownership,
    devices, xattrs a non-root writer cannot set) is such a failure: PackagingError with the
    counts, and no output."""
    out = Path(output)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise PackagingError(f"output {str(out)!r} exists and is not an empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent)
    except OSError as exc:
        raise PackagingError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from exc
    try:
        report = apply_plan(plan, tmp, locate, progress=progress, cancel=cancel,
                            on_layer_done=on_layer_done)
        if strict and report.not_preserved:
            lost = ", ".join(f"{what}: {n}" for what, n in sorted(report.not_preserved.items()))
            raise PackagingError(f"refusing a lossy build (--strict): {str(out)!r} would lack "
                                 f"metadata ({lost})"
                                 + ("; run as root to keep it" if os.geteuid() != 0 else ""))
        os.rename(tmp, out)
    except BaseException as exc:
        remove_tree(tmp)
        if isinstance(exc, OSError):
            raise PackagingError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from exc
        raise
    return report
