"""The export pipeline, stage by stage: resolve -> fetch layers -> flatten -> package.

The local CLI calls :func:`export`, which runs the stages in this process with a thread pool.
The Celery tasks call the same stage functions (:func:`resolve`, :func:`fetch_layer`,
:func:`build_output`) from different processes and hosts, sharing the blob cache.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from worker.cache.index import LayerIndex
from worker.errors import Canceled, ConfigError, LayerError, PackagingError
from worker.progress import Phase, ProgressCallback, ProgressEvent, no_progress
from worker.pull.manifest import ResolvedImage
from worker.settings import Settings


class OutputFormat(StrEnum):
    EXT4 = "ext4"
    TAR = "tar"
    DIR = "dir"


class Ext4Method(StrEnum):
    AUTO = "auto"
    STREAM = "stream"   # flattened tar piped into `mke2fs -d -` (e2fsprogs >= 1.47.1)
    MOUNT = "mount"     # loop-mount an empty filesystem and apply into it (root)
    DIR = "dir"         # flatten into a private staging dir, then `mke2fs -d DIR`
    DIRECT = "direct"   # lay out the filesystem ourselves, data in large sequential writes


@dataclass(frozen=True, slots=True)
class AddSpec:
    """``--add SRC:DEST``: a local file or tree laid on top of the image as a final layer."""

    source: Path
    dest: str
    mode: int | None = None
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class Ext4Options:
    method: Ext4Method = Ext4Method.AUTO
    size: int | None = None            # explicit image size in bytes (overrides sizing)
    headroom: float | None = None      # fraction; None = settings.ext4_headroom
    min_free: int | None = None        # bytes; None = settings.ext4_min_free
    features: str = "default"          # "default" | "compat" | explicit mke2fs -O list
    label: str = "rootfs"
    shrink: bool = False               # e2fsck -f + resize2fs -M before headroom
    strict: bool = False               # refuse lossy (non-root dir method) builds


@dataclass(frozen=True, slots=True)
class ExportRequest:
    image: str
    output: str                        # path, or "-" for a tar on stdout
    format: OutputFormat = OutputFormat.EXT4
    platform: str | None = None
    ext4: Ext4Options = field(default_factory=Ext4Options)
    adds: tuple[AddSpec, ...] = ()
    low_disk: bool = False
    sidecar: bool = True


@dataclass(frozen=True, slots=True)
class ExportResult:
    image: str
    manifest_digest: str
    platform: str
    format: OutputFormat
    output: str
    output_size: int
    sha256: str | None                 # of the output file (ext4, tar file); None for dir/stdout
    counts: dict[str, int]
    config: dict[str, Any]             # ImageConfig.runtime_dict()
    #: seconds per phase ("resolve", "download", "plan", "apply", "package", "check", ...).
    #: Phases may overlap (the stream method packages while layers are still read, and the
    #: layer downloads run concurrently), so they need not add up; "total" is the job's wall
    #: time, measured around all of them.
    timings: dict[str, float]
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)   # method, fs size, inodes, ...

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object, the ``OUT.json`` sidecar and the API's job result."""
        return {
            "image": self.image,
            "manifest_digest": self.manifest_digest,
            "platform": self.platform,
            "format": str(self.format),
            "output": self.output,
            "output_size": self.output_size,
            "sha256": self.sha256,
            "counts": dict(self.counts),
            "config": self.config,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "extra": dict(self.extra),
        }


def resolve(image: str, platform: str | None, settings: Settings, *,
            credentials: Any = None) -> ResolvedImage:
    """Resolve ``image`` to one platform manifest and its config (registry I/O).

    ``credentials`` (a :class:`~worker.pull.credentials.Credentials` or ``CredentialSource``)
    come from CLI flags; without them Docker's config.json and credential helpers are used.
    """
    from worker.pull.manifest import Platform
    from worker.pull.reference import parse_reference
    from worker.pull.registry import RegistryClient

    ref = parse_reference(image)
    wanted = Platform.parse(platform) if platform else None
    with RegistryClient.for_reference(ref, settings, credentials=credentials) as client:
        return client.resolve(ref, wanted)


def fetch_layer(resolved: ResolvedImage, layer: int, settings: Settings, *,
                progress: ProgressCallback = no_progress,
                cancel: threading.Event | None = None,
                credentials: Any = None) -> LayerIndex:
    """Make layer number ``layer`` present and indexed in the cache. Idempotent.

    Accepts ``credentials=`` like :func:`resolve` (keyword, default: Docker's config).
    """
    from worker.pull.fetch import fetch_one_layer

    return fetch_one_layer(resolved, layer, settings, credentials=credentials,
                           progress=progress, cancel=cancel)


def build_output(resolved: ResolvedImage, layers: list[LayerIndex], request: ExportRequest,
                 settings: Settings, *, progress: ProgressCallback = no_progress,
                 cancel: threading.Event | None = None) -> ExportResult:
    """Flatten cached layers and package them as ``request.format`` at ``request.output``.

    ``layers`` are the indexes of ``resolved.layers`` (bottom first), their blobs in the cache.
    Plans the tree (checking the limits again on the result), then writes the directory, the
    tar (a file, or stdout for ``"-"``) or the ext4 image, always under a temporary name renamed
    into place at the end: on any error or cancel nothing is left at ``request.output``. With
    ``request.low_disk`` each layer blob leaves the cache as soon as it has been read. Writes
    the ``OUT.json`` sidecar when ``request.sidecar`` (not for stdout).
    """
    started = time.monotonic()
    result = _build(resolved, layers, request, settings, progress=progress, cancel=cancel,
                    timings={})
    result.timings["total"] = time.monotonic() - started
    _finish(result, request, progress)
    return result


def export(request: ExportRequest, settings: Settings, *,
           progress: ProgressCallback = no_progress,
           cancel: threading.Event | None = None,
           credentials: Any = None) -> ExportResult:
    """The whole job in this process: resolve, fetch layers concurrently, build the output.

    ``credentials`` as for :func:`resolve` (CLI flags); default: Docker's config.
    """
    from worker.pull.fetch import fetch_layers

    started = time.monotonic()
    check_output(request)   # before any download: a doomed output costs nothing
    timings: dict[str, float] = {}
    t = time.monotonic()
    progress(ProgressEvent(phase=Phase.RESOLVE, message=f"resolving {request.image}"))
    resolved = resolve(request.image, request.platform, settings, credentials=credentials)
    timings["resolve"] = time.monotonic() - t
    _check_cancel(cancel)
    t = time.monotonic()
    # --low-disk bounds the disk the export takes: no uncompressed copies beside the blobs
    fetch_settings = settings.model_copy(update={"cache_uncompressed": False}) \
        if request.low_disk else settings
    layers = fetch_layers(resolved, fetch_settings, credentials=credentials,
                          progress=progress, cancel=cancel)
    timings["download"] = time.monotonic() - t
    result = _build(resolved, layers, request, settings, progress=progress, cancel=cancel,
                    timings=timings)
    result.timings["total"] = time.monotonic() - started
    _finish(result, request, progress)
    return result


# -- building the output ---------------------------------------------------------------------

def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Canceled("export canceled")


def _check_request(request: ExportRequest) -> None:
    if request.output == "-" and request.format != OutputFormat.TAR:
        raise ConfigError("-o - (standard output) is only possible with --format tar")
    if not request.output:
        raise ConfigError("no output path given")


def check_output(request: ExportRequest) -> None:
    """Refuse an output (or sidecar) path that cannot or must not be written, before any work.

    The output is built under a temporary name beside it and renamed into place: that rename
    must never replace a device node, a directory with content, or anything through a symlink.
    So an existing output must be a regular file (tar, ext4) or an empty directory (dir), never
    a symlink; the same goes for the ``OUT.json`` sidecar (a regular file). The directory that
    will hold them must take a new file, which is tried for real. ``-o -`` is standard output.
    Raises ConfigError / PackagingError naming the path.
    """
    _check_request(request)
    if request.output == "-":
        return
    out = os.path.abspath(request.output)
    check_output_path(out, directory=request.format == OutputFormat.DIR)
    if request.sidecar:
        check_output_path(out + ".json", directory=False)
    parent = os.path.dirname(out)
    if request.format == OutputFormat.EXT4 and not os.path.isdir(parent):
        raise PackagingError(f"cannot write {out}: directory {parent} does not exist")
    # tar and dir create missing parents: probe the nearest one that exists
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".probe",
                                     dir=parent)
    except OSError as exc:
        raise PackagingError(f"cannot write {out}: {parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str, *, directory: bool) -> None:
    """PackagingError unless ``path`` is absent, or (``directory``) an empty directory, or
    (not ``directory``) a regular file; a symlink is always refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PackagingError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise PackagingError(f"refusing to write {path}: it is a symlink")
    if directory:
        if not stat.S_ISDIR(st.st_mode) or os.listdir(path):
            raise PackagingError(f"refusing to write {path}: it exists and is not an empty "
                                 "directory")
    elif not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise PackagingError(f"refusing to write {path}: it exists and is {what}")


def _finish(result: ExportResult, request: ExportRequest, progress: ProgressCallback) -> None:
    if request.sidecar and request.output != "-":
        from worker.package.sidecar import write_sidecar
        write_sidecar(result.output, result.to_dict())
    progress(ProgressEvent(phase=Phase.DONE, message=f"wrote {result.output}"))


def _build(resolved: ResolvedImage, layers: list[LayerIndex], request: ExportRequest,
           settings: Settings, *, progress: ProgressCallback,
           cancel: threading.Event | None, timings: dict[str, float]) -> ExportResult:
    from worker.cache.blobs import BlobCache

    check_output(request)
    if len(layers) != len(resolved.layers):
        raise LayerError(f"{len(layers)} layer indexes for an image with "
                         f"{len(resolved.layers)} layers")
    _check_cancel(cancel)
    cache = BlobCache(settings.cache_dir)
    scratch = contextlib.ExitStack()
    try:
        return _build_with(resolved, layers, request, settings, progress=progress,
                           cancel=cancel, timings=timings, cache=cache, scratch=scratch)
    finally:
        scratch.close()


def _build_with(resolved: ResolvedImage, layers: list[LayerIndex], request: ExportRequest,
                settings: Settings, *, progress: ProgressCallback,
                cancel: threading.Event | None, timings: dict[str, float],
                cache: Any, scratch: contextlib.ExitStack) -> ExportResult:
    from worker.flatten.dirout import apply_plan, write_dir
    from worker.flatten.plan import check_plan_limits, plan_layers
    from worker.flatten.tarout import write_tar, write_tar_file

    t = time.monotonic()
    all_layers = list(layers)
    identity = resolved.manifest_digest
    add_index: LayerIndex | None = None
    add_path: Path | None = None
    if request.adds:
        # --add: one more (uncompressed, local) layer on top, through the same planner.
        from worker.package.adds import adds_layer

        tmpdir = scratch.enter_context(tempfile.TemporaryDirectory(prefix="add-layer-",
                                                                   dir=cache.tmp_dir))
        add_index, add_path = adds_layer(request.adds, tmpdir)
        all_layers.append(add_index)
        identity = f"{identity}+{add_index.diff_id}"
    progress(ProgressEvent(phase=Phase.APPLY, layers_total=len(all_layers),
                           message="planning the flattened tree"))
    plan = plan_layers(all_layers, max_path_length=settings.max_path_length)
    check_plan_limits(plan, max_uncompressed_bytes=settings.max_uncompressed_bytes,
                      max_entries=settings.max_entries, max_path_length=settings.max_path_length)
    timings["plan"] = time.monotonic() - t

    holds = [contextlib.ExitStack() for _ in layers]

    def locate(layer: LayerIndex) -> Path:
        if layer is add_index and add_path is not None:
            return add_path
        return Path(cache.path(layer.digest))

    # An image may use one blob at several positions: it goes once its last use is read.
    last_use = {layer.digest: i for i, layer in enumerate(layers)}

    def layer_done(i: int) -> None:
        if i >= len(layers):          # the --add layer: not in the cache
            return
        holds[i].close()
        if request.low_disk and last_use[layers[i].digest] == i:
            # Another job reading the same blob holds a shared lock: leave it to that job.
            with cache.lock(layers[i].digest, blocking=False) as mine:
                if mine:
                    cache.delete(layers[i].digest)

    warnings: list[str] = []
    extra: dict[str, Any] = {}
    sha: str | None = None
    output = request.output if request.output == "-" else os.path.abspath(request.output)
    try:
        for i, layer in enumerate(layers):
            # Shared locks keep `cache gc` away from the blobs while we read them.
            holds[i].enter_context(cache.lock(layer.digest, shared=True))
        t = time.monotonic()
        if request.format == OutputFormat.TAR:
            if request.output == "-":
                rep = write_tar(plan, sys.stdout.buffer, locate, progress=progress,
                                cancel=cancel, on_layer_done=layer_done)
                size = rep.bytes_written
            else:
                rep, sha = write_tar_file(plan, output, locate, progress=progress, cancel=cancel,
                                          on_layer_done=layer_done)
                size = rep.bytes_written
            extra["passthrough_headers"] = rep.passthrough
            timings["apply"] = time.monotonic() - t
        elif request.format == OutputFormat.DIR:
            drep = write_dir(plan, output, locate, progress=progress, cancel=cancel,
                             on_layer_done=layer_done, strict=request.ext4.strict)
            size = plan.file_bytes
            warnings.extend(drep.warnings)
            if drep.not_preserved:
                extra["not_preserved"] = dict(drep.not_preserved)
            timings["apply"] = time.monotonic() - t
        else:
            from worker.package.ext4 import build_ext4

            def tar_writer(f: BinaryIO) -> None:
                write_tar(plan, f, locate, progress=progress, cancel=cancel,
                          on_layer_done=layer_done)

            def dir_writer(target: Path) -> None:
                # Its report's warnings (e.g. ownership a non-root writer could not set in
                # the staging tree) are not the image's: the ext4 build restores that with
                # debugfs, and Ext4Build.warnings says what the image really lacks.
                apply_plan(plan, target, locate, progress=progress, cancel=cancel,
                           on_layer_done=layer_done)

            build = build_ext4(plan, request, settings, identity=identity,
                               write_tar=tar_writer, write_dir=dir_writer, progress=progress,
                               cancel=cancel, locate=locate, on_layer_done=layer_done)
            output, size, sha = str(build.output), build.output_size, build.sha256
            warnings.extend(build.warnings)
            extra.update(build.extra())
            timings["package"] = time.monotonic() - t
            for k, v in build.timings.items():
                if k != "total":   # the packaging's own; "total" is the whole job's
                    timings.setdefault(k, v)
    finally:
        for h in holds:
            h.close()
    counts = dict(plan.counts)
    counts["entries"] = len(plan.entries)
    return ExportResult(image=request.image, manifest_digest=resolved.manifest_digest,
                        platform=str(resolved.platform), format=request.format, output=output,
                        output_size=size, sha256=sha, counts=counts,
                        config=resolved.config.runtime_dict(), timings=dict(timings),
                        warnings=tuple(warnings), extra=extra)
