"""Building ext4 images from real tars in tests: plans, writers, and reading images back."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.flatten.local import local_plan
from tests.support.imagebuilder import Layer, TarEntry
from worker.export import ExportRequest, Ext4Method, Ext4Options
from worker.flatten.dirout import apply_plan
from worker.flatten.plan import FlatPlan
from worker.flatten.reader import BlobLocator
from worker.flatten.tarout import write_tar
from worker.package.ext4 import Ext4Build, build_ext4
from worker.progress import ProgressCallback, no_progress
from worker.settings import Settings, load_settings


@dataclass
class Built:
    plan: FlatPlan
    locate: BlobLocator
    build: Ext4Build


def make_plan(tmp: Path, layers: list[list[TarEntry]] | list[Layer]) -> tuple[FlatPlan, BlobLocator]:
    built = [layer if isinstance(layer, Layer) else Layer.from_entries(layer, compression="none")
             for layer in layers]
    return local_plan(tmp / "cache", built)


def small_settings(**kw: Any) -> Settings:
    defaults: dict[str, Any] = {"ext4_min_free": 8 << 20}
    defaults.update(kw)
    return load_settings(**defaults)


def build(plan: FlatPlan, locate: BlobLocator, output: Path, *, method: str = "stream",
          settings: Settings | None = None, identity: str = "sha256:" + "ab" * 32,
          progress: ProgressCallback = no_progress, cancel: threading.Event | None = None,
          write_tar_fn: Any = None, write_dir_fn: Any = None, **ext4: Any) -> Ext4Build:
    request = ExportRequest(image="test/image", output=str(output),
                            ext4=Ext4Options(method=Ext4Method(method), **ext4))

    def tar_writer(f: Any) -> None:
        write_tar(plan, f, locate, cancel=cancel)

    def dir_writer(target: Path) -> None:
        apply_plan(plan, target, locate, cancel=cancel)

    return build_ext4(plan, request, settings or small_settings(), identity=identity,
                      write_tar=write_tar_fn or tar_writer, write_dir=write_dir_fn or dir_writer,
                      progress=progress, cancel=cancel, locate=locate)


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True).stdout


def dumpe2fs(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                         check=True).stdout
    res: dict[str, str] = {}
    for line in out.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            res.setdefault(k.strip(), v.strip())
    return res


def stat_times(image: Path, path: str) -> dict[str, int]:
    out = debugfs(image, f'stat "{path}"')
    return {m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"^\s*(\w+): 0x([0-9a-f]+)", out, re.M)}


def rdump(image: Path, dest: Path) -> Path:
    """Extract the whole image with ``debugfs rdump`` (as root: owners and modes kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(image)], capture_output=True,
                   check=True)
    return dest


def tree_listing(root: Path, *, skip: tuple[str, ...] = ("lost+found",),
                 with_mtime: bool = True) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, uid, gid, size, sha256 or link target, xattrs, [mtime])."""
    out: dict[str, tuple[Any, ...]] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        rel_dir = os.path.relpath(dirpath, rootb)
        if rel_dir == b"." :
            dirnames[:] = [d for d in dirnames if os.fsdecode(d) not in skip]
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.normpath(os.path.join(rel_dir, name)))
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                size = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                content = os.fsdecode(os.readlink(full))
                size = 0
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                size = 0
            else:
                content, size = "", 0
            try:
                names = sorted(os.listxattr(full, follow_symlinks=False))
                xattrs = tuple((n, os.getxattr(full, n, follow_symlinks=False)) for n in names)
            except OSError:
                xattrs = ()
            row: tuple[Any, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                                    content, xattrs)
            if with_mtime:
                # nanoseconds: every method gives a float mtime the same ones
                # (worker.flatten.times)
                row += (st.st_mtime_ns,)
            out[rel] = row
    return out
