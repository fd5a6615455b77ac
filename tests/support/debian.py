"""The real Debian test image: debootstrap bookworm + a package install + deletions.

Three layers, built once per machine (root needed: debootstrap, chroot, device nodes):

1. ``debootstrap --variant=minbase bookworm`` from the mirror in the machine's apt sources;
2. ``apt-get install --no-install-recommends python3`` in a chroot, captured as a diff of
   before/after snapshots (new and changed paths, ``.wh.`` whiteouts for deleted ones);
3. deletions (docs, man pages, apt lists and caches) as whiteouts, ``etc/apt/apt.conf.d``
   replaced by an opaque directory holding one new file, ``usr/share/lintian`` (a directory)
   replaced by a file, and a new file carrying ``security.capability`` and ``user.*`` xattrs.

The ground truth, ``listing.json``, is an ``os.lstat`` walk of the final build directory itself
(never the output of an unpacker). Layer blobs, config, OCI manifest, listing and ``info.json``
are cached under ``$ROOTFS_EXPORT_TEST_IMAGES`` (default ``/var/cache/rootfs-export-test``)
in ``debian-bookworm-v1/``; later runs only push. The build happens in a temp dir next to it,
renamed into place when complete, under a lock so concurrent sessions build once.

Run standalone: ``scripts/build-debian-image`` (or ``python -m tests.support.debian build``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_NAME = "debian-bookworm-v1"
SUITE = "bookworm"
DEFAULT_CACHE_ROOT = Path("/var/cache/rootfs-export-test")
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
FIXED_TIME = "2024-01-01T00:00:00Z"

LAYER3_DELETE_GLOBS = [
    "usr/share/doc/*", "usr/share/man/*", "var/lib/apt/lists/*", "var/cache/apt/*.bin",
]
OPAQUE_DIR = "etc/apt/apt.conf.d"
OPAQUE_NEW_FILE = "etc/apt/apt.conf.d/99rootfs-export-test"
DIR_REPLACED_BY_FILE = "usr/share/lintian"
CAP_FILE = "usr/local/bin/cap-test"
# security.capability v2: cap_net_bind_service (bit 10) permitted + effective
CAP_NET_BIND_SERVICE = bytes.fromhex("0100000200040000000000000000000000000000")


class DebianBuildError(RuntimeError):
    """The Debian image could not be built; the message says which step and why."""


def log(msg: str) -> None:
    print(f"[debian-image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("ROOTFS_EXPORT_TEST_IMAGES") or DEFAULT_CACHE_ROOT)


def image_dir() -> Path:
    return cache_root() / IMAGE_NAME


# -- mirror from the machine's apt sources -----------------------------------------------------------
def find_mirror() -> str:
    """The Debian mirror the machine's apt sources use for bookworm (never hard-coded)."""
    if os.environ.get("ROOTFS_EXPORT_TEST_MIRROR"):
        return os.environ["ROOTFS_EXPORT_TEST_MIRROR"]
    candidates: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(path).read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            if SUITE in fields.get("suites", "").split():
                candidates += fields.get("uris", "").split()
    list_files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in list_files:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(errors="replace").splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    candidates.append(words[1])
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    raise DebianBuildError(
        f"no Debian mirror for {SUITE} found in /etc/apt/sources.list(.d); "
        "set ROOTFS_EXPORT_TEST_MIRROR=http://your-mirror/debian"
    )


# -- tree snapshots -----------------------------------------------------------------------------------
@dataclass
class Node:
    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    sha256: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def same_as(self, other: Node) -> bool:
        return (self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.ctime_ns,
                self.ino, self.target, self.rdev, self.sha256, self.xattrs) == (
            other.kind, other.mode, other.uid, other.gid, other.size, other.mtime_ns,
            other.ctime_ns, other.ino, other.target, other.rdev, other.sha256, other.xattrs)


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


def _kind(st: os.stat_result) -> str:
    return _KINDS.get(stat.S_IFMT(st.st_mode), "socket")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def snapshot(root: Path) -> dict[str, Node]:
    """Every path under ``root`` (relative, '/'-separated, root itself excluded) -> Node."""
    nodes: dict[str, Node] = {}
    root_s = str(root)

    def walk(abs_dir: str, rel_dir: str) -> None:
        with os.scandir(abs_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise DebianBuildError(f"non-UTF-8 name in build tree: {rel!r}") from None
            st = os.lstat(entry.path)
            kind = _kind(st)
            node = Node(kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                        size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                        ino=st.st_ino, nlink=st.st_nlink, xattrs=_xattrs(entry.path))
            if kind == "symlink":
                node.target = os.readlink(entry.path)
            elif kind == "file":
                node.sha256 = _sha256_file(entry.path)
            elif kind in ("char", "block"):
                node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            nodes[rel] = node
            if kind == "dir":
                walk(entry.path, rel)

    walk(root_s, "")
    return nodes


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _ancestors(path: str) -> Iterator[str]:
    parent = _parent(path)
    while parent:
        yield parent
        parent = _parent(parent)


def _sort_key(path: str) -> tuple[str, ...]:
    # parents before children, siblings by name
    return tuple(path.split("/"))


@dataclass
class LayerPlan:
    """What one layer holds: paths to copy from the tree, whiteouts, opaque directories."""

    description: str
    paths: list[str]
    whiteouts: list[str]
    opaque_dirs: list[str]


def plan_diff(before: dict[str, Node], after: dict[str, Node], description: str,
              opaque_dirs: tuple[str, ...] = ()) -> LayerPlan:
    """The layer turning ``before`` into ``after``.

    Changed or new paths are copied; a deleted path becomes a whiteout only when its parent
    survives as the same directory (a deleted parent's whiteout covers it; a directory replaced
    by a file removes its children by itself; an opaque directory hides everything below).
    """
    changed = {p for p, n in after.items() if p not in before or not before[p].same_as(n)}
    whiteouts: list[str] = []
    for path in before:
        if path in after:
            continue
        parent = _parent(path)
        if any(parent == d or parent.startswith(d + "/") for d in opaque_dirs):
            continue
        if parent and not (parent in after and after[parent].kind == "dir"
                           and before[parent].kind == "dir"):
            continue
        whiteouts.append(path)
    for d in opaque_dirs:
        if d not in after or after[d].kind != "dir":
            raise DebianBuildError(f"opaque directory {d} is not a directory after the step")
        changed.add(d)
    paths = set(changed)
    for p in list(changed) + whiteouts:
        paths.update(_ancestors(p))
    return LayerPlan(description, sorted(paths, key=_sort_key), sorted(whiteouts, key=_sort_key),
                     sorted(opaque_dirs))


# -- writing layer blobs -------------------------------------------------------------------------------
class _HashingWriter(io.RawIOBase):
    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def _tarinfo_for(root: Path, rel: str, node: Node) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mode = node.mode
    info.uid, info.gid = node.uid, node.gid
    info.uname = info.gname = ""
    info.mtime = node.mtime_ns // 1_000_000_000  # the tree's mtimes are truncated to match
    types = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
             "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
    if node.kind not in types:
        raise DebianBuildError(f"{rel}: cannot put a {node.kind} into a layer")
    info.type = types[node.kind]
    if node.kind == "file":
        info.size = node.size
    elif node.kind == "symlink":
        info.linkname = node.target
    elif node.kind in ("char", "block"):
        info.devmajor, info.devminor = node.rdev
    if node.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                            for k, v in node.xattrs.items()}
    return info


def write_layer(root: Path, nodes: dict[str, Node], plan: LayerPlan, blobs_dir: Path
                ) -> dict[str, Any]:
    """Write ``plan`` as a gzip PAX tar blob (numeric owners, hardlinks, xattrs)."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = blobs_dir / f".layer-{os.getpid()}.tmp"
    opaque = set(plan.opaque_dirs)
    whiteouts_by_parent: dict[str, list[str]] = {}
    for w in plan.whiteouts:
        whiteouts_by_parent.setdefault(_parent(w), []).append(w)
    entries = 0
    with open(tmp_path, "wb") as out:
        compressed = _HashingWriter(out)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0,
                           compresslevel=6) as gz:
            raw = _HashingWriter(gz)
            with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT,
                              encoding="utf-8") as tar:
                first_name_of_inode: dict[int, str] = {}

                def emit_markers(dirpath: str) -> None:
                    nonlocal entries
                    if dirpath in opaque:
                        marker = tarfile.TarInfo(f"{dirpath}/.wh..wh..opq")
                        marker.mtime = 0
                        tar.addfile(marker, io.BytesIO(b""))
                        entries += 1
                    for w in whiteouts_by_parent.pop(dirpath, []):
                        name = w.rpartition("/")[2]
                        marker = tarfile.TarInfo(
                            f"{dirpath}/.wh.{name}" if dirpath else f".wh.{name}")
                        marker.mtime = 0
                        tar.addfile(marker, io.BytesIO(b""))
                        entries += 1

                emit_markers("")  # whiteouts directly under the root
                for rel in plan.paths:
                    node = nodes[rel]
                    info = _tarinfo_for(root, rel, node)
                    if node.kind == "file" and node.nlink > 1:
                        first = first_name_of_inode.get(node.ino)
                        if first is not None:
                            info.type = tarfile.LNKTYPE
                            info.linkname = first
                            info.size = 0
                        else:
                            first_name_of_inode[node.ino] = rel
                    if info.type == tarfile.REGTYPE:
                        with open(root / rel, "rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
                    entries += 1
                    if node.kind == "dir":
                        emit_markers(rel)
        if whiteouts_by_parent:
            raise DebianBuildError(f"whiteouts whose parent is not in the layer: "
                                   f"{sorted(whiteouts_by_parent)[:5]}")
    digest = "sha256:" + compressed.sha.hexdigest()
    os.replace(tmp_path, blobs_dir / compressed.sha.hexdigest())
    return {
        "digest": digest,
        "diff_id": "sha256:" + raw.sha.hexdigest(),
        "size": compressed.size,
        "uncompressed_size": raw.size,
        "media_type": LAYER_MEDIA_TYPE,
        "description": plan.description,
        "entries": entries,
        "whiteouts": len(plan.whiteouts),
        "opaque_dirs": plan.opaque_dirs,
    }


# -- chroot steps -----------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, **kw: Any) -> None:
    log(f"{what}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.decode(errors="replace").splitlines()[-40:])
        raise DebianBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as fh:
        return any(line.split()[1] == real for line in fh if len(line.split()) > 1)


def _mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/mounts") as fh:
        points = [line.split()[1] for line in fh if len(line.split()) > 1]
    return sorted((p for p in points if p == real or p.startswith(real + "/")), reverse=True)


def _unmount_all(path: Path) -> None:
    for point in _mounts_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    left = _mounts_under(path)
    if left:
        raise DebianBuildError(f"could not unmount {left}; remove them by hand")


@contextlib.contextmanager
def chroot_env(rootfs: Path) -> Iterator[None]:
    """/proc mounted, no service starts (policy-rc.d), the host's DNS; all undone afterwards."""
    policy = rootfs / "usr/sbin/policy-rc.d"
    resolv = rootfs / "etc/resolv.conf"
    saved_resolv: bytes | str | None = None
    if resolv.is_symlink():
        saved_resolv = os.readlink(resolv)
    elif resolv.exists():
        saved_resolv = resolv.read_bytes()
    try:
        policy.write_text("#!/bin/sh\n# no daemons while building an image\nexit 101\n")
        policy.chmod(0o755)
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        (rootfs / "proc").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
        yield
    finally:
        _unmount_all(rootfs)
        with contextlib.suppress(FileNotFoundError):
            policy.unlink()
        with contextlib.suppress(FileNotFoundError):
            resolv.unlink()
        if isinstance(saved_resolv, str):
            os.symlink(saved_resolv, resolv)
        elif isinstance(saved_resolv, bytes):
            resolv.write_bytes(saved_resolv)


def _chroot_cmd(rootfs: Path, *args: str) -> list[str]:
    return ["chroot", str(rootfs), "/usr/bin/env", "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8", "HOME=/root", *args]


def step_debootstrap(rootfs: Path, mirror: str) -> None:
    _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], "debootstrap")


def step_install_python(rootfs: Path) -> None:
    with chroot_env(rootfs):
        _run(_chroot_cmd(rootfs, "apt-get", "update", "-q"), "apt-get update")
        _run(_chroot_cmd(rootfs, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                         "python3"), "apt-get install python3")
    # drop the downloaded .debs like Docker's debian images do; the *.bin caches stay for
    # layer 3 to delete
    for deb in glob.glob(str(rootfs / "var/cache/apt/archives/*.deb")):
        os.unlink(deb)


def step_deletions(rootfs: Path) -> None:
    for pattern in LAYER3_DELETE_GLOBS:
        for path in glob.glob(str(rootfs / pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    # a whole directory replaced: in the layer, an opaque dir with one new file
    shutil.rmtree(rootfs / OPAQUE_DIR)
    (rootfs / OPAQUE_DIR).mkdir(mode=0o755)
    new_file = rootfs / OPAQUE_NEW_FILE
    new_file.write_text('// rootfs-export test image: the only file left in this directory\n'
                        'APT::Install-Recommends "false";\n')
    new_file.chmod(0o644)
    os.setxattr(new_file, "user.rootfs-export.test", b"opaque-replacement")
    # a directory replaced by a file
    target = rootfs / DIR_REPLACED_BY_FILE
    if target.is_dir():
        shutil.rmtree(target)
    target.write_text("this was a directory in the lower layers\n")
    target.chmod(0o644)
    # file capabilities travel as the security.capability xattr
    cap = rootfs / CAP_FILE
    cap.parent.mkdir(parents=True, exist_ok=True)
    cap.write_text("#!/bin/sh\necho cap-test\n")
    cap.chmod(0o755)
    os.setxattr(cap, "security.capability", CAP_NET_BIND_SERVICE)


def truncate_mtimes(root: Path) -> None:
    """Drop sub-second mtimes so the tree equals what the tars (whole seconds) record."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            whole = st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000
            if whole != st.st_mtime_ns:
                os.utime(path, ns=(st.st_atime_ns, whole), follow_symlinks=False)


# -- listing (ground truth) -----------------------------------------------------------------------------
def make_listing(nodes: dict[str, Node]) -> list[dict[str, Any]]:
    """JSON-ready entries for the final tree; hardlink groups keyed by their first path."""
    groups: dict[int, list[str]] = {}
    for path, node in nodes.items():
        if node.kind == "file" and node.nlink > 1:
            groups.setdefault(node.ino, []).append(path)
    group_of = {p: min(paths, key=_sort_key) for paths in groups.values() if len(paths) > 1
                for p in paths}
    out = []
    for path in sorted(nodes, key=_sort_key):
        n = nodes[path]
        entry: dict[str, Any] = {
            "path": path, "type": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid,
            "size": n.size if n.kind in ("file", "symlink") else None,
            "sha256": n.sha256, "target": n.target if n.kind == "symlink" else None,
            "hardlink": group_of.get(path), "nlink": n.nlink if n.kind == "file" else None,
            "mtime": n.mtime_ns // 1_000_000_000,
            "rdev": list(n.rdev) if n.kind in ("char", "block") else None,
            "xattrs": {k: v.hex() for k, v in n.xattrs.items()},
        }
        out.append(entry)
    return out


# -- the whole build -------------------------------------------------------------------------------------
def _host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _write_json(path: Path, doc: Any) -> bytes:
    data = json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"
    path.write_bytes(data)
    return data


def build_into(work: Path) -> Path:
    """Build the image under ``work``; return ``work/out`` holding the finished cache dir."""
    if os.geteuid() != 0:
        raise DebianBuildError("building the Debian image needs root (debootstrap, chroot); "
                               "run: sudo scripts/build-debian-image")
    for tool in ("debootstrap", "chroot", "mount", "dpkg"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            raise DebianBuildError(f"{tool} not found (apt install debootstrap)")
    started = time.monotonic()
    mirror = find_mirror()
    rootfs, out = work / "rootfs", work / "out"
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    timings: dict[str, float] = {}
    layers: list[dict[str, Any]] = []
    try:
        t = time.monotonic()
        step_debootstrap(rootfs, mirror)
        timings["debootstrap"] = time.monotonic() - t
        # the root directory's own metadata is not part of any layer: pin it
        os.chmod(rootfs, 0o755)
        t = time.monotonic()
        s1 = snapshot(rootfs)
        layers.append(write_layer(rootfs, s1, plan_diff({}, s1, "debootstrap --variant=minbase "
                                                        f"{SUITE}"), blobs))
        timings["layer1"] = time.monotonic() - t

        t = time.monotonic()
        step_install_python(rootfs)
        s2 = snapshot(rootfs)
        layers.append(write_layer(rootfs, s2, plan_diff(
            s1, s2, "apt-get install --no-install-recommends python3"), blobs))
        timings["layer2"] = time.monotonic() - t

        t = time.monotonic()
        step_deletions(rootfs)
        s3 = snapshot(rootfs)
        layers.append(write_layer(rootfs, s3, plan_diff(
            s2, s3, "delete docs, man pages, apt lists/caches; opaque etc/apt/apt.conf.d; "
            "usr/share/lintian dir->file; file capability", opaque_dirs=(OPAQUE_DIR,)), blobs))
        timings["layer3"] = time.monotonic() - t

        truncate_mtimes(rootfs)
        final = snapshot(rootfs)
    finally:
        _unmount_all(rootfs)
    listing = make_listing(final)
    _write_json(out / "listing.json", listing)

    arch = _host_arch()
    config = {
        "created": FIXED_TIME,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8"],
            "Cmd": ["/bin/bash"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": "rootfs-export test debian bookworm",
                       "org.opencontainers.image.description":
                           "debootstrap minbase + python3 + deletions"},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [{"created": FIXED_TIME, "created_by": layer["description"]}
                    for layer in layers],
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    (blobs / config_hex).write_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{config_hex}",
                   "size": len(config_bytes)},
        "layers": [{"mediaType": layer["media_type"], "digest": layer["digest"],
                    "size": layer["size"]} for layer in layers],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    (out / "manifest.json").write_bytes(manifest_bytes)
    (out / "config.json").write_bytes(config_bytes)
    timings["total"] = time.monotonic() - started
    _write_json(out / "info.json", {
        "image": IMAGE_NAME,
        "mirror": mirror,
        "architecture": arch,
        "manifest_digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
        "config_digest": f"sha256:{config_hex}",
        "layers": layers,
        "listing_entries": len(listing),
        "build_seconds": {k: round(v, 1) for k, v in timings.items()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return out


def _complete(path: Path) -> bool:
    return all((path / name).is_file()
               for name in ("info.json", "manifest.json", "config.json", "listing.json"))


def _chrooted_pids(path: Path) -> list[int]:
    """Processes whose root is inside ``path``: chroot children of a build that was killed."""
    real = os.path.realpath(path)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            root = os.readlink(entry / "root")
            if root == real or root.startswith(real + "/"):
                pids.append(int(entry.name))
    return pids


def _remove_tree(path: Path) -> None:
    for pid in _chrooted_pids(path):
        log(f"stopping leftover build process {pid} chrooted in {path}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _chrooted_pids(path):
        time.sleep(1)
    if _mounts_under(path):
        _unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)


def ensure_debian_image(force: bool = False) -> Path:
    """Build the cached image unless it is there; return its directory. Safe to run concurrently."""
    final = image_dir()
    if _complete(final) and not force:
        return final
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise DebianBuildError(f"cannot create {root}; run as root or set "
                               "ROOTFS_EXPORT_TEST_IMAGES to a writable dir") from None
    lock_path = root / f"{IMAGE_NAME}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building {final}; waiting for {lock_path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(final) and not force:
            return final
        # leftovers of an interrupted build (we hold the lock, so nobody is using them)
        for stale in root.glob(f".tmp-{IMAGE_NAME}-*"):
            log(f"removing leftover {stale}")
            _remove_tree(stale)
        work = root / f".tmp-{IMAGE_NAME}-{os.getpid()}"
        work.mkdir()
        try:
            log(f"building {IMAGE_NAME} in {work} (takes a few minutes, once per machine)")
            out = build_into(work)
            if final.exists():
                old = root / f".tmp-{IMAGE_NAME}-old-{os.getpid()}"
                final.rename(old)
                _remove_tree(old)
            out.rename(final)
            log(f"done: {final}")
        finally:
            _remove_tree(work)
    return final


# -- loading and pushing ---------------------------------------------------------------------------------
@dataclass
class DebianImage:
    """The cached Debian image as pushed into a registry."""

    reference: str  # 127.0.0.1:PORT/debian:bookworm
    digest_reference: str  # 127.0.0.1:PORT/debian@sha256:...
    manifest_digest: str
    manifest: dict
    manifest_bytes: bytes
    config_digest: str
    config: dict
    layers: list[dict]  # digest, diff_id, size, uncompressed_size, description, entries, ...
    listing_path: Path
    entries: list[dict]  # listing.json as written (sorted by path)
    listing: dict[str, dict]  # path ("usr/bin/python3", no leading "/") -> entry
    cache_dir: Path
    info: dict

    def blob_path(self, digest: str) -> Path:
        return self.cache_dir / "blobs" / "sha256" / digest.split(":", 1)[1]

    def resolve(self, path: str) -> dict:
        return resolve_in_listing(self.listing, path)


def resolve_in_listing(listing: dict[str, dict], path: str, max_links: int = 40) -> dict:
    """The entry ``path`` leads to, following symlinks (in every component) inside the root."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        entry = listing.get(candidate)
        if entry is None:
            raise KeyError(f"{path}: {candidate} not in listing")
        if entry["type"] == "symlink":
            links += 1
            if links > max_links:
                raise KeyError(f"{path}: too many symlinks")
            target = entry["target"]
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    if not resolved:
        return {"path": "", "type": "dir"}
    return listing["/".join(resolved)]


def load_debian_image(directory: Path | None = None) -> dict[str, Any]:
    directory = directory or image_dir()
    info = json.loads((directory / "info.json").read_text())
    return info


def push_debian_image(registry: Any, repo: str = "debian", tag: str = "bookworm",
                      *, build: bool = True) -> DebianImage:
    """Push the cached image (building it first if needed) into ``registry``."""
    from tests.support.imagebuilder import push_blob_file, push_manifest_bytes

    directory = ensure_debian_image() if build else image_dir()
    if not _complete(directory):
        raise DebianBuildError(f"no cached Debian image in {directory}; "
                               "run: sudo scripts/build-debian-image")
    info = json.loads((directory / "info.json").read_text())
    manifest_bytes = (directory / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    blob_dir = directory / "blobs" / "sha256"
    for desc in [manifest["config"], *manifest["layers"]]:
        push_blob_file(registry, repo, blob_dir / desc["digest"].split(":", 1)[1],
                       desc["digest"])
    digest = push_manifest_bytes(registry, repo, tag, manifest_bytes, OCI_MANIFEST)
    entries = json.loads((directory / "listing.json").read_text())
    return DebianImage(
        reference=f"{registry.host}/{repo}:{tag}",
        digest_reference=f"{registry.host}/{repo}@{digest}",
        manifest_digest=digest, manifest=manifest, manifest_bytes=manifest_bytes,
        config_digest=manifest["config"]["digest"],
        config=json.loads((directory / "config.json").read_text()),
        layers=info["layers"], listing_path=directory / "listing.json", entries=entries,
        listing={e["path"]: e for e in entries}, cache_dir=directory, info=info,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build-debian-image", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-dir", action="store_true", help="only print the cache dir")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(image_dir())
        return 0
    try:
        directory = ensure_debian_image(force=args.force)
    except DebianBuildError as exc:
        print(f"build-debian-image: {exc}", file=sys.stderr)
        return 1
    info = json.loads((directory / "info.json").read_text())
    print(json.dumps({"dir": str(directory), "manifest_digest": info["manifest_digest"],
                      "layers": [{k: layer[k] for k in ("digest", "size", "entries")}
                                 for layer in info["layers"]],
                      "listing_entries": info["listing_entries"],
                      "build_seconds": info["build_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
