"""Package a flattened plan as an ext4 disk image (the main job).

Three methods produce equivalent trees (see :class:`~worker.export.Ext4Method`):

``stream``
    the flattened tar is written by ``write_tar`` (in a thread) into the stdin of
    ``mke2fs -t ext4 -d - IMAGE``; rootless, one pass (e2fsprogs >= 1.47.1).
``mount``
    an empty filesystem is loop-mounted (``nosuid,nodev,noexec``) and ``write_dir`` applies the
    plan into the mount point; root only.
``dir``
    ``write_dir`` applies the plan into a private staging directory, then ``mke2fs -d DIR``.

The image is written to a temporary name next to ``request.output`` and renamed on success;
any failure (or cancel) removes it, the staging directory and any mount / loop device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from worker.progress import ProgressCallback, no_progress

if TYPE_CHECKING:
    # worker.export imports this module from build_output: keep the import one-way at runtime.
    from worker.export import ExportRequest, Ext4Method
    from worker.flatten.plan import FlatPlan
    from worker.settings import Settings

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
        }


def build_ext4(plan: FlatPlan, request: ExportRequest, settings: Settings, *,
               identity: str,
               write_tar: TarWriter,
               write_dir: DirWriter,
               progress: ProgressCallback = no_progress,
               cancel: threading.Event | None = None) -> Ext4Build:
    """Build ``request.output`` as an ext4 image holding ``plan``; return what was made.

    ``identity`` is the manifest digest (for ``--add`` builds, the digest plus the add layer's
    diff_id): together with ``request.ext4`` it seeds the UUID and directory hash seed so that
    the same identity and options give a byte-identical image. ``write_tar`` / ``write_dir``
    are the flatten stage's writers bound to the plan and the blob cache; only the one the
    chosen method needs is called. ``request.adds`` must already be part of ``plan`` (see
    :func:`worker.package.adds.adds_layer`). The ``OUT.json`` sidecar is not written here:
    ``build_output`` writes it with :func:`worker.package.sidecar.write_sidecar` after it made
    the ExportResult. Raises PackagingError / ToolMissing / Canceled; leaves nothing behind.
    """
    raise NotImplementedError
