"""The export pipeline, stage by stage: resolve -> fetch layers -> flatten -> package.

The local CLI calls :func:`export`, which runs the stages in this process with a thread pool.
The Celery tasks call the same stage functions (:func:`resolve`, :func:`fetch_layer`,
:func:`build_output`) from different processes and hosts, sharing the blob cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from worker.cache.index import LayerIndex
from worker.progress import ProgressCallback, no_progress
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
    timings: dict[str, float]          # seconds per phase
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)   # method, fs size, inodes, ...

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object, the ``OUT.json`` sidecar and the API's job result."""
        raise NotImplementedError


def resolve(image: str, platform: str | None, settings: Settings) -> ResolvedImage:
    """Resolve ``image`` to one platform manifest and its config (registry I/O)."""
    raise NotImplementedError


def fetch_layer(resolved: ResolvedImage, layer: int, settings: Settings, *,
                progress: ProgressCallback = no_progress,
                cancel: threading.Event | None = None) -> LayerIndex:
    """Make layer number ``layer`` present and indexed in the cache. Idempotent."""
    raise NotImplementedError


def build_output(resolved: ResolvedImage, layers: list[LayerIndex], request: ExportRequest,
                 settings: Settings, *, progress: ProgressCallback = no_progress,
                 cancel: threading.Event | None = None) -> ExportResult:
    """Flatten cached layers and package them as ``request.format`` at ``request.output``."""
    raise NotImplementedError


def export(request: ExportRequest, settings: Settings, *,
           progress: ProgressCallback = no_progress,
           cancel: threading.Event | None = None) -> ExportResult:
    """The whole job in this process: resolve, fetch layers concurrently, build the output."""
    raise NotImplementedError
