"""Export real images to dir and tar through the CLI and compare the two results.

A *listing* maps each path to what a runtime sees there: type, permission bits, owner, mtime
(integer nanoseconds), size, link target, sha256 of the content, xattrs and device numbers. Hardlinks are compared
as groups of paths sharing one inode.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.imagebuilder import Layer, push_image
from worker.cli import main

Listing = dict[str, tuple[Any, ...]]


def _sha_file(fd_path: str | bytes) -> str:
    h = hashlib.sha256()
    with open(fd_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_listing(root: Path) -> tuple[Listing, set[frozenset[str]]]:
    """Listing of a directory tree (never following symlinks) and its hardlink groups."""
    out: Listing = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    rootb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in [b"", *dirnames, *filenames] if dirpath == rootb else [*dirnames, *filenames]:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.fsdecode(os.path.relpath(full, rootb))
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            link = os.fsdecode(os.readlink(full)) if stat.S_ISLNK(st.st_mode) else ""
            sha = _sha_file(full) if stat.S_ISREG(st.st_mode) else ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) \
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else (0, 0)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                xattrs = tuple(sorted((k, os.getxattr(full, k)) for k in os.listxattr(full)))
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns, size, link, sha, xattrs, dev)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    groups = {frozenset(g) for g in inodes.values() if len(g) > 1}
    return out, groups


_TAR_KINDS = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
              tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
              tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
              tarfile.FIFOTYPE: stat.S_IFIFO}


def tar_mtime_ns(ti: tarfile.TarInfo) -> int:
    """A member's mtime in nanoseconds, exactly as its header writes it (tarfile's float
    cannot hold nanoseconds): the PAX record if there is one, else the ustar field."""
    text = ti.pax_headers.get("mtime")
    if text is None:
        return int(ti.mtime) * 1_000_000_000
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        return int((decimal.Decimal(text) * 1_000_000_000).to_integral_value(
            rounding=decimal.ROUND_FLOOR))


def tar_listing(path: Path) -> tuple[Listing, set[frozenset[str]], list[str]]:
    """Listing of a tar (Python's reader), its hardlink groups and the member order."""
    out: Listing = {}
    links: dict[str, set[str]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            name = ti.name.rstrip("/")
            name = name[2:] if name.startswith("./") else name
            name = name or "."
            order.append(name)
            if ti.type == tarfile.LNKTYPE:
                target = ti.linkname[2:] if ti.linkname.startswith("./") else ti.linkname
                links.setdefault(target, {target}).add(name)
                out[name] = out[target]
                continue
            kind = _TAR_KINDS[ti.type]
            sha = ""
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                sha = hashlib.sha256(f.read()).hexdigest()
            xattrs = tuple(sorted((k[len("SCHILY.xattr."):],
                                   v.encode("utf-8", "surrogateescape"))
                                  for k, v in ti.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            dev = (ti.devmajor, ti.devminor) if ti.ischr() or ti.isblk() else (0, 0)
            out[name] = (kind, ti.mode & 0o7777, ti.uid, ti.gid, tar_mtime_ns(ti),
                         ti.size if ti.isreg() else 0, ti.linkname if ti.issym() else "",
                         sha, xattrs, dev)
    return out, {frozenset(g) for g in links.values()}, order


@dataclass
class Exported:
    ref: str
    dir: Path
    tar: Path
    listing: Listing
    groups: set[frozenset[str]]
    result_dir: dict[str, Any]
    result_tar: dict[str, Any]

    def kind(self, path: str) -> int:
        return self.listing[path][0]

    def content(self, path: str) -> bytes:
        return (self.dir / path).read_bytes()


def run_export(ref: str, out: Path, fmt: str, cache: Path, *extra: str) -> tuple[int, str, str]:
    """``rootfs-export export`` in a subprocess: (exit status, stdout, stderr)."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "rootfs-export"), "export", ref,
           "-o", str(out), "--format", fmt, "--cache-dir", str(cache), "--json", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def export_cli(ref: str, out: Path, fmt: str, cache: Path, capsys: Any,
               *extra: str) -> dict[str, Any]:
    """Export through ``worker.cli.main`` in-process; return the ``--json`` object."""
    capsys.readouterr()
    rc = main(["export", ref, "-o", str(out), "--format", fmt, "--cache-dir", str(cache),
               "--json", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def check_tar_consumers(tar: Path, work: Path, listing: Listing) -> None:
    """GNU tar lists and extracts the tar exactly; mke2fs -d - builds a clean ext4 from it."""
    p = subprocess.run(["tar", "-tvf", str(tar)], capture_output=True, text=True)
    # Non-UTF-8 names are flagged hdrcharset=BINARY (POSIX; libarchive honours it); GNU tar
    # 1.34 says it ignores the keyword and uses the raw bytes, which is what it means.
    noise = "tar: Ignoring unknown extended header keyword 'hdrcharset'"
    assert p.returncode == 0 and not [ln for ln in p.stderr.splitlines() if ln != noise], \
        p.stderr
    x = work / "gnu-extract"
    x.mkdir()
    p = subprocess.run(["tar", "-xf", str(tar), "-C", str(x), "--numeric-owner", "--same-owner",
                        "--same-permissions", "--xattrs", "--xattrs-include=*"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got, _ = dir_listing(x)
    assert got == listing
    img = work / "img.ext4"
    # LC_ALL=C: libarchive must not need a UTF-8 locale to take our names
    p = subprocess.run(f"mke2fs -q -F -t ext4 -d - {img} 256M < {tar}", shell=True,
                       capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    img.unlink()


def export_both(registry: Any, tmp: Path, capsys: Any, name: str, layers: list[Layer],
                *, consumers: bool = True) -> Exported:
    """Push ``layers`` as an image, export it as dir and as tar, assert both agree."""
    repo = "flatten/" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    img = push_image(registry, repo, "v1", layers)
    cache = tmp / "cache"
    d, t = tmp / "out-dir", tmp / "out.tar"
    rd = export_cli(img.reference, d, "dir", cache, capsys)
    rt = export_cli(img.reference, t, "tar", cache, capsys)
    dl, dgroups = dir_listing(d)
    tl, tgroups, order = tar_listing(t)
    assert dl == tl
    assert dgroups == tgroups
    # every directory before its children
    seen: set[str] = set()
    for p in order:
        parent = p.rpartition("/")[0] or "."
        assert p == "." or parent in seen, f"{p} comes before its parent directory"
        seen.add(p)
    assert rd["counts"] == rt["counts"]
    if consumers:
        work = tmp / "consumers"
        work.mkdir()
        check_tar_consumers(t, work, tl)
    return Exported(img.reference, d, t, dl, dgroups, rd, rt)
