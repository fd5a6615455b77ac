"""``--add SRC:DEST``: local files and trees laid on top of the image as one final layer.

The layer is a plain tar built here and indexed with the same indexer as registry layers, so
it goes through the same safe planner (whiteouts do not apply; paths climbing out of the root
are rejected; DEST parents that do not exist become implied root-owned 0755 directories and
existing ones keep their metadata, since only DEST and what is below it are in the layer).

How ``build_output`` uses it (the add layer is NOT in the blob cache: no cache lock, no
``--low-disk`` deletion for it, and ``on_layer_done`` may be called with its index)::

    add_index, add_blob = adds_layer(request.adds, tmpdir)        # tmpdir: removed afterwards
    plan = plan_layers([*layers, add_index], ...)
    locate = with_add_layer(cache_locate, add_index, add_blob)
    identity = add_identity(resolved.manifest_digest, add_index)  # for build_ext4

Semantics, per spec: a file SRC lands at DEST (or at ``DEST/basename(SRC)`` when DEST ends in
``/``); a directory SRC lands as the directory DEST with SRC's contents below it. Symlinks in
SRC are stored as symlinks (never followed); hardlinks within SRC stay hardlinks; sockets are
skipped. Every entry gets ``uid:gid`` from the spec; ``mode`` (when given) replaces the
permission bits of regular files. Entries are written in sorted order with their own mtimes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cache.decompress import read_file_chunks
from worker.cache.index import LayerIndex, index_tar_stream, normalize_path
from worker.errors import ConfigError
from worker.flatten.reader import BlobLocator

if TYPE_CHECKING:
    from worker.export import AddSpec

ADD_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"


def parse_add(text: str, *, mode: str | None = None, owner: str = "0:0") -> AddSpec:
    """``SRC:DEST`` plus ``--add-mode``/``--add-owner`` -> AddSpec; ConfigError if malformed."""
    from worker.export import AddSpec

    src, sep, dest = text.rpartition(":")
    if not sep or not src or not dest:
        raise ConfigError(f"--add {text!r}: expected SRC:DEST (a local path and a path in the image)")
    try:
        uid_s, _, gid_s = owner.partition(":")
        uid, gid = int(uid_s), int(gid_s or uid_s)
        if uid < 0 or gid < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--add-owner {owner!r}: expected UID:GID (numbers)") from None
    mode_bits = None
    if mode is not None:
        try:
            mode_bits = int(mode, 8)
        except ValueError:
            raise ConfigError(f"--add-mode {mode!r}: expected an octal mode like 0755") from None
        if not 0 <= mode_bits <= 0o7777:
            raise ConfigError(f"--add-mode {mode!r}: not a permission mode")
    return AddSpec(source=Path(src), dest=dest, mode=mode_bits, uid=uid, gid=gid)


def _dest_path(spec: AddSpec) -> str:
    dest = spec.dest
    if dest.endswith("/") and not spec.source.is_dir():
        dest = dest + spec.source.name
    path = normalize_path(dest, what="--add destination")
    if path == "." and not spec.source.is_dir():
        raise ConfigError(f"--add {spec.source}:{spec.dest}: a file cannot replace the root")
    return path


def _tarinfo(tf: tarfile.TarFile, src: str, arcname: str, spec: AddSpec) -> tarfile.TarInfo | None:
    st = os.lstat(src)
    if stat.S_ISSOCK(st.st_mode):
        return None
    ti = tf.gettarinfo(src, arcname=arcname)
    ti.uid, ti.gid = spec.uid, spec.gid
    ti.uname = ti.gname = ""
    if spec.mode is not None and ti.isreg():
        ti.mode = spec.mode
    return ti


def _write_spec(tf: tarfile.TarFile, spec: AddSpec) -> None:
    src = spec.source
    if not os.path.lexists(src):
        raise ConfigError(f"--add {src}:{spec.dest}: {src} does not exist")
    dest = _dest_path(spec)
    items: list[tuple[str, str]] = []
    if src.is_dir() and not src.is_symlink():
        items.append((str(src), dest))
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = os.path.relpath(dirpath, src)
            for name in sorted([*dirnames, *filenames]):
                sub = name if rel == "." else os.path.join(rel, name)
                items.append((os.path.join(dirpath, name),
                              sub if dest == "." else f"{dest}/{sub}"))
    else:
        items.append((str(src), dest))
    for path, arcname in items:
        try:
            ti = _tarinfo(tf, path, arcname, spec)
        except OSError as exc:
            raise ConfigError(f"--add {src}:{spec.dest}: cannot read {path}: {exc.strerror}") from None
        if ti is None:
            continue
        if ti.isreg():
            try:
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            except OSError as exc:
                raise ConfigError(f"--add {src}:{spec.dest}: cannot read {path}: "
                                  f"{exc.strerror}") from None
        else:
            tf.addfile(ti)


def adds_layer(adds: Sequence[AddSpec], tmpdir: str | os.PathLike[str]) -> tuple[LayerIndex, Path]:
    """Build the ``--add`` layer as an uncompressed tar in ``tmpdir``; return its index and path.

    Append the index as the LAST layer before planning; the blob is read from the returned path
    (compression ``"none"``), not from the cache. Raises ConfigError naming a bad SRC or DEST,
    UnsafeLayerEntry for a DEST climbing out of the root.
    """
    if not adds:
        raise ValueError("adds_layer needs at least one --add")
    path = Path(tmpdir) / "add-layer.tar"
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                 format=tarfile.PAX_FORMAT) as tf:
        for spec in adds:
            _write_spec(tf, spec)
    digest = hashlib.sha256()
    for chunk in read_file_chunks(str(path)):
        digest.update(chunk)
    blob_digest = "sha256:" + digest.hexdigest()
    index = index_tar_stream(read_file_chunks(str(path)), layer="--add layer")
    size = path.stat().st_size
    return LayerIndex(digest=blob_digest, diff_id=index.diff_id, media_type=ADD_LAYER_MEDIA_TYPE,
                      compression="none", compressed_size=size,
                      uncompressed_size=index.uncompressed_size, entries=index.entries), path


def with_add_layer(locate: BlobLocator, add_index: LayerIndex, add_blob: Path) -> BlobLocator:
    """A locator that finds the add layer at ``add_blob`` and every other layer via ``locate``."""
    def located(layer: LayerIndex) -> str | Path:
        return add_blob if layer is add_index else locate(layer)
    return located


def add_identity(manifest_digest: str, add_index: LayerIndex) -> str:
    """The reproducibility identity of an image plus an add layer (its content, by diff_id)."""
    return f"{manifest_digest}+add:{add_index.diff_id}"
