"""The benchmark's input images: built once per machine, cached on disk, pushed to a local registry.

Images (``--images`` names):

- ``a``: the 3-layer Debian minbase image of the test suite (package install, deletions), built
  by ``tests/support/debian.py`` and reused from its cache;
- ``b``: a "big" Debian image, debootstrap minbase + python3, perl, git, build-essential,
  python3-dev, libboost-dev, in four gzip layers (base, interpreters, toolchain, a clean-up
  layer with whiteouts);
- ``c``: the same layers compressed with zstd;
- ``d``: 100k tiny files (metadata stress), two gzip layers;
- ``b2x``: ``b`` plus one layer holding b's whole tree again under ``/srv/copy`` (2x size);
- ``l1``, ``l4``, ``l16``: b's final tree split into 1, 4 or 16 layers (same content).

Everything lives under ``$ROOTFS_EXPORT_BENCH_DIR`` (default /var/cache/rootfs-export-bench):
``images/<name>/`` holds the compressed blobs, the config and ``image.json`` (digests, sizes,
counts); ``rootfs-big/`` is b's final tree, kept to derive the variants. Builds write into a
temporary name and rename it at the end, so an interrupted build is redone, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import requests

from bench.measure import cleanup_workdir, run_checked

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
CREATED = "2024-01-01T00:00:00Z"
# python3-dev and libboost-dev (C++ headers: many small files) bring the tree to the issue's
# 500-900 MB and 20k+ entries.
BIG_PACKAGES = [["python3", "python3-pip", "perl", "git"],
                ["build-essential", "python3-dev", "libboost-dev"]]
# Deleted by the last layer of the big image so exports must honour whiteouts.
BIG_CLEANUP = ["usr/share/doc", "usr/share/man", "var/lib/apt/lists", "var/cache/apt"]
TINY_FILES = 100_000
BUILD_TIMEOUT = 3600.0


def bench_dir() -> Path:
    return Path(os.environ.get("ROOTFS_EXPORT_BENCH_DIR", "/var/cache/rootfs-export-bench"))


@dataclass(slots=True)
class LayerBlob:
    path: str                 # compressed blob on disk
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    media_type: str


@dataclass(slots=True)
class BenchImage:
    """A built image on disk and what the benchmark needs to know about it."""

    name: str
    repo: str
    tag: str
    description: str
    compression: str
    layers: list[LayerBlob]
    config_path: str
    config_digest: str
    entries: int               # entries in the final tree
    tree_bytes: int            # bytes of regular files in the final tree
    manifest: dict[str, Any] = field(default_factory=dict)
    reference: str = ""        # set once pushed: HOST/repo:tag

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)

    @property
    def largest_layer(self) -> int:
        return max(layer.size for layer in self.layers)

    def save(self, path: Path) -> None:
        d = asdict(self)
        d.pop("reference")
        path.write_text(json.dumps(d, indent=2))

    @classmethod
    def load(cls, path: Path) -> BenchImage:
        d = json.loads(path.read_text())
        d["layers"] = [LayerBlob(**layer) for layer in d["layers"]]
        return cls(**d)


# -- layer writing -------------------------------------------------------------------------

class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def compress_cmd(compression: str) -> list[str]:
    # pigz/zstd on all cores: building is a one-off, speed matters more than ratio.
    if compression == "gzip":
        return ["pigz", "-6", "-c"] if shutil.which("pigz") else ["gzip", "-6", "-c"]
    if compression == "zstd":
        return ["zstd", "-3", "-T0", "-q", "-c"]
    raise ValueError(f"unknown compression {compression!r}")


def write_raw_layer(raw: Path, fill: Callable[[tarfile.TarFile], None]) -> tuple[str, int]:
    """Write an uncompressed layer tar to ``raw``; ``fill`` adds the members. Return
    (diff_id, size)."""
    with open(raw, "wb") as sink:
        hw = _HashingWriter(sink)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                          bufsize=1 << 20) as tf:
            fill(tf)
    return "sha256:" + hw.sha.hexdigest(), hw.size


def compress_layer(raw: Path, diff_id: str, size: int, dest: Path, comp: str) -> LayerBlob:
    """Compress ``raw`` into ``dest`` with ``comp`` and describe the blob."""
    with open(raw, "rb") as src, open(dest, "wb") as dst:
        subprocess.run(compress_cmd(comp), stdin=src, stdout=dst, check=True,
                       timeout=BUILD_TIMEOUT)
    return LayerBlob(path=str(dest), digest=_sha256_file(dest), size=dest.stat().st_size,
                     diff_id=diff_id, uncompressed_size=size, media_type=LAYER_MEDIA[comp])


def write_layer(out: Path, fill: Callable[[tarfile.TarFile], None],
                comp: str = "gzip") -> LayerBlob:
    """One compressed layer at ``out`` + ``.tar.gz``/``.tar.zst``, via a temporary raw tar."""
    raw = out.with_suffix(".tar.tmp")
    diff_id, size = write_raw_layer(raw, fill)
    suffix = {"gzip": ".tar.gz", "zstd": ".tar.zst"}[comp]
    blob = compress_layer(raw, diff_id, size, out.with_suffix(suffix), comp)
    raw.unlink()
    return blob


def add_paths(tf: tarfile.TarFile, root: Path, paths: Iterable[str], prefix: str = "") -> None:
    """Add ``paths`` (relative to ``root``, parents before children) to ``tf`` as ``prefix+path``."""
    for rel in paths:
        full = root / rel
        ti = tf.gettarinfo(str(full), arcname=prefix + rel)
        if ti is None:      # sockets cannot live in a tar
            continue
        ti.uname = ti.gname = ""
        if ti.isreg():
            with open(full, "rb") as f:
                tf.addfile(ti, f)
        else:
            tf.addfile(ti)


def add_whiteouts(tf: tarfile.TarFile, deleted: Iterable[str]) -> None:
    for rel in deleted:
        parent, _, name = rel.rpartition("/")
        ti = tarfile.TarInfo((parent + "/" if parent else "") + ".wh." + name)
        ti.mtime = 1704067200
        tf.addfile(ti)


# -- tree snapshots and diffs ----------------------------------------------------------------

Snapshot = dict[str, tuple[int, ...]]


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` (relative path, lstat), parents before children, sorted."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        names = sorted(os.listdir(root / rel_dir) if rel_dir else os.listdir(root), reverse=True)
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.lstat(root / rel)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def ordered_walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Like :func:`walk` but in lexical depth-first order (a directory, then its contents)."""
    out: list[tuple[str, os.stat_result]] = []

    def visit(rel_dir: str) -> None:
        for name in sorted(os.listdir(root / rel_dir) if rel_dir else os.listdir(root)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.lstat(root / rel)
            out.append((rel, st))
            if stat.S_ISDIR(st.st_mode):
                visit(rel)

    visit("")
    return out


def snapshot(root: Path) -> Snapshot:
    return {rel: (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                  st.st_ino, st.st_rdev) for rel, st in ordered_walk(root)}


def diff(before: Snapshot, after: Snapshot) -> tuple[list[str], list[str]]:
    """(paths added or changed, in tree order; top-most deleted paths) between two snapshots.

    ctime is part of the key, so any change to content, metadata or link count is seen."""
    changed = [p for p, key in after.items() if before.get(p) != key]
    gone = set(before) - set(after)
    deleted = sorted(p for p in gone if p.rpartition("/")[0] not in gone)
    return changed, deleted


def tree_counts(root: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) of a tree."""
    entries = size = 0
    for _rel, st in walk(root):
        entries += 1
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return entries, size


# -- the registry ---------------------------------------------------------------------------

def push(image: BenchImage, registry_url: str, registry_host: str) -> str:
    """Push ``image`` (blobs streamed from disk, monolithic upload) unless the registry already
    serves its manifest; return ``HOST/repo:tag``."""
    body = json.dumps(image.manifest, indent=2).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    ref = f"{registry_host}/{image.repo}:{image.tag}"
    with requests.Session() as s:
        head = s.head(f"{registry_url}/v2/{image.repo}/manifests/{image.tag}",
                      headers={"Accept": OCI_MANIFEST}, timeout=30)
        if head.status_code == 200 and head.headers.get("Docker-Content-Digest") == digest:
            return ref
        blobs = [(image.config_path, image.config_digest)] + [
            (layer.path, layer.digest) for layer in image.layers]
        for path, blob_digest in blobs:
            url = f"{registry_url}/v2/{image.repo}/blobs/{blob_digest}"
            if s.head(url, timeout=30).status_code == 200:
                continue
            resp = s.post(f"{registry_url}/v2/{image.repo}/blobs/uploads/", timeout=30)
            resp.raise_for_status()
            location = urljoin(registry_url + "/", resp.headers["Location"])
            with open(path, "rb") as f:
                resp = s.put(location, params={"digest": blob_digest}, data=f, timeout=1800,
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Length": str(os.path.getsize(path))})
            if resp.status_code >= 300:
                raise RuntimeError(f"push {path} to {image.repo}: HTTP {resp.status_code} "
                                   f"{resp.text[:300]}")
        resp = s.put(f"{registry_url}/v2/{image.repo}/manifests/{image.tag}", data=body,
                     headers={"Content-Type": OCI_MANIFEST}, timeout=60)
        if resp.status_code >= 300:
            raise RuntimeError(f"push manifest {ref}: HTTP {resp.status_code} {resp.text[:300]}")
    return ref


def finish_image(out: Path, name: str, description: str, compression: str,
                 layers: list[LayerBlob], entries: int, tree_bytes: int,
                 repo: str | None = None, tag: str | None = None) -> BenchImage:
    """Write the config blob and manifest for ``layers``; save ``image.json`` in ``out``."""
    config = {
        "created": CREATED, "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": f"rootfs-export bench layer {i}"}
                    for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_path = out / "config.json"
    config_path.write_bytes(config_bytes)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }
    image = BenchImage(name=name, repo=repo or f"bench/{name}", tag=tag or "v1",
                       description=description, compression=compression, layers=layers,
                       # where it will be once ``out`` is renamed to its final name
                       config_path=str(out.with_suffix("") / "config.json"),
                       config_digest=config_digest,
                       entries=entries, tree_bytes=tree_bytes, manifest=manifest)
    image.save(out / "image.json")
    return image


# -- builders ---------------------------------------------------------------------------------

def _mirror() -> str:
    """The Debian mirror the machine's apt sources use (no host is hard-coded)."""
    try:
        from tests.support.debian import debian_mirror  # type: ignore[attr-defined]

        return str(debian_mirror())
    except (ImportError, AttributeError):
        pass
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        uri = ""
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
            if line.startswith("Suites:") and "bookworm" in line.split()[1:] and uri:
                return uri
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    raise RuntimeError("no bookworm mirror in the apt sources; cannot debootstrap")


def _chroot_apt_install(root: Path, packages: list[str], log: IO[str]) -> None:
    """apt-get install in the chroot with /proc and /dev mounted, unmounted whatever happens."""
    mounts = []
    try:
        for src, dst, opts in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"])):
            target = root / dst
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", *opts, src, str(target)], check=True, timeout=60)
            mounts.append(target)
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                    ["apt-get", "clean"]):
            subprocess.run(["chroot", str(root), *cmd], check=True, env=env, stdout=log,
                           stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
        policy.unlink()
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", str(target)], timeout=60)


def build_big(base: Path, log: IO[str]) -> dict[str, BenchImage]:
    """Images b (gzip) and c (zstd): debootstrap + package installs + a clean-up layer.

    Each stage's changes (snapshot diff, ctime included) are written as a raw layer tar right
    after the stage, then every raw tar is compressed twice. The final tree stays on disk
    (``rootfs-big``) for the variants b2x and l*."""
    root = base / "rootfs-big"
    tmp = base / "rootfs-big.tmp"
    raws = base / "images/big-raw.tmp"
    for d in (tmp, raws, root):
        cleanup_workdir(d)
    raws.mkdir(parents=True)
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"bench: debootstrap minbase bookworm into {tmp} ...", flush=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", "bookworm",
                    str(tmp), _mirror()], check=True, stdout=log, stderr=subprocess.STDOUT,
                   timeout=BUILD_TIMEOUT)
    raw_layers: list[tuple[Path, str, int]] = []

    def emit(changed: list[str], deleted: list[str]) -> None:
        i = len(raw_layers)
        print(f"bench: big layer {i}: {len(changed)} entries, {len(deleted)} whiteouts "
              f"({time.monotonic() - t0:.0f}s)", flush=True)
        raw = raws / f"layer{i}.tar"
        diff_id, size = write_raw_layer(raw, _layer_fill(tmp, changed, deleted))
        raw_layers.append((raw, diff_id, size))

    before = snapshot(tmp)
    emit(list(before), [])
    for pkgs in BIG_PACKAGES:
        print(f"bench: apt-get install {' '.join(pkgs)} ({time.monotonic() - t0:.0f}s)",
              flush=True)
        _chroot_apt_install(tmp, pkgs, log)
        after = snapshot(tmp)
        emit(*diff(before, after))
        before = after
    for rel in BIG_CLEANUP:
        path = tmp / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()     # the directory stays, emptied, as real clean-up layers leave it
    emit(*diff(before, snapshot(tmp)))
    entries, size = tree_counts(tmp)
    images = {}
    for name, comp in (("b", "gzip"), ("c", "zstd")):
        out = base / f"images/{name}.tmp"
        final = base / f"images/{name}"
        cleanup_workdir(out)
        out.mkdir(parents=True)
        suffix = {"gzip": ".tar.gz", "zstd": ".tar.zst"}[comp]
        layers = []
        for raw, diff_id, usize in raw_layers:
            print(f"bench: compressing {raw.name} with {comp} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
            blob = compress_layer(raw, diff_id, usize, out / (raw.stem + suffix), comp)
            layers.append(_relocate(blob, out, final))
        desc = (f"Debian bookworm minbase + {', '.join(p for ps in BIG_PACKAGES for p in ps)}, "
                f"{len(layers)} {comp} layers (the last deletes docs, man pages, locales)")
        finish_image(out, name, desc, comp, layers, entries, size)
        cleanup_workdir(final)
        out.rename(final)
        images[name] = BenchImage.load(final / "image.json")
    cleanup_workdir(raws)
    tmp.rename(root)
    print(f"bench: big images ready ({time.monotonic() - t0:.0f}s)", flush=True)
    return images


def _layer_fill(root: Path, changed: list[str], deleted: list[str],
                prefix: str = "") -> Callable[[tarfile.TarFile], None]:
    def fill(tf: tarfile.TarFile) -> None:
        add_whiteouts(tf, [prefix + d for d in deleted])
        add_paths(tf, root, changed, prefix)
    return fill


def _relocate(layer: LayerBlob, old: Path, new: Path) -> LayerBlob:
    layer.path = str(new / Path(layer.path).relative_to(old))
    return layer


def build_b2x(base: Path, log: IO[str]) -> BenchImage:
    """b's layers plus b's final tree again under /srv/copy: twice the bytes and entries."""
    b = ensure_built("b", base, log)
    root = base / "rootfs-big"
    out = base / "images/b2x.tmp"
    cleanup_workdir(out)
    out.mkdir(parents=True)
    rels = [rel for rel, _ in ordered_walk(root)]

    def fill(tf: tarfile.TarFile) -> None:
        _add_dirs(tf, ["srv", "srv/copy"])
        add_paths(tf, root, rels, "srv/copy/")

    extra = write_layer(out / "copy", fill)
    layers = [*b.layers, extra]
    final = base / "images/b2x"
    extra = _relocate(extra, out, final)
    finish_image(out, "b2x", "image b plus its whole tree again under /srv/copy (2x size)",
                 "gzip", layers, b.entries * 2 + 2, b.tree_bytes * 2)
    cleanup_workdir(final)
    out.rename(final)
    return BenchImage.load(final / "image.json")


def _add_dirs(tf: tarfile.TarFile, dirs: list[str]) -> None:
    for d in dirs:
        ti = tarfile.TarInfo(d)
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
        ti.mtime = 1704067200
        tf.addfile(ti)


def build_layer_split(base: Path, count: int, log: IO[str]) -> BenchImage:
    """b's final tree split into ``count`` layers: every layer carries all directories and a
    hash-chosen share of the other entries, so content stays fixed while layers vary."""
    b = ensure_built("b", base, log)
    root = base / "rootfs-big"
    name = f"l{count}"
    out = base / f"images/{name}.tmp"
    cleanup_workdir(out)
    out.mkdir(parents=True)
    walked = ordered_walk(root)
    dirs = [rel for rel, st in walked if stat.S_ISDIR(st.st_mode)]
    others = [rel for rel, st in walked if not stat.S_ISDIR(st.st_mode)]
    # Hardlinked names must stay in one layer (a link may only point down or sideways).
    inode_share: dict[int, int] = {}
    shares: list[list[str]] = [[] for _ in range(count)]
    by_rel = dict(walked)
    for rel in others:
        st = by_rel[rel]
        key = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) % count
        if st.st_nlink > 1:
            key = inode_share.setdefault(st.st_ino, key)
        shares[key].append(rel)
    layers = []
    for i, share in enumerate(shares):
        members = sorted(dirs + share)

        def fill(tf: tarfile.TarFile, members: list[str] = members) -> None:
            add_paths(tf, root, members)

        layers.append(write_layer(out / f"layer{i}", fill))
    final = base / f"images/{name}"
    layers = [_relocate(layer, out, final) for layer in layers]
    finish_image(out, name, f"image b's final tree split into {count} gzip layers", "gzip",
                 layers, b.entries, b.tree_bytes)
    cleanup_workdir(final)
    out.rename(final)
    return BenchImage.load(final / "image.json")


def build_tiny(base: Path, log: IO[str]) -> BenchImage:
    """100k files of 0-512 bytes in 200 directories, two gzip layers (deterministic)."""
    out = base / "images/d.tmp"
    cleanup_workdir(out)
    out.mkdir(parents=True)
    rng = random.Random(20240101)
    per_layer = TINY_FILES // 2
    ndirs = 100
    layers = []
    total = 0
    for layer in range(2):
        payloads = [rng.randbytes(rng.randrange(0, 513)) for _ in range(per_layer)]
        total += sum(len(p) for p in payloads)

        def fill(tf: tarfile.TarFile, layer: int = layer, payloads: list[bytes] = payloads) -> None:
            import io

            dirs = [f"tiny/l{layer}/d{j:03d}" for j in range(ndirs)]
            _add_dirs(tf, (["tiny"] if layer == 0 else []) + [f"tiny/l{layer}"] + dirs)
            for k, data in enumerate(payloads):
                ti = tarfile.TarInfo(f"{dirs[k % ndirs]}/f{k:06d}.txt")
                ti.size = len(data)
                ti.mode = 0o644
                ti.mtime = 1704067200
                tf.addfile(ti, io.BytesIO(data))

        layers.append(write_layer(out / f"layer{layer}", fill))
    final = base / "images/d"
    layers = [_relocate(layer, out, final) for layer in layers]
    entries = TINY_FILES + 1 + 2 * (1 + ndirs)
    finish_image(out, "d", f"{TINY_FILES} tiny files (0-512 bytes) in two gzip layers", "gzip",
                 layers, entries, total)
    cleanup_workdir(final)
    out.rename(final)
    return BenchImage.load(final / "image.json")


def build_debian_small(base: Path, log: IO[str]) -> BenchImage:
    """Image a: the test suite's 3-layer Debian image, built (or taken from its cache under
    /var/cache/rootfs-export-test) by tests/support/debian.py; only described here."""
    from tests.support import debian

    src = debian.ensure_debian_image()
    info = json.loads((src / "info.json").read_text())
    manifest = json.loads((src / "manifest.json").read_text())
    listing = json.loads((src / "listing.json").read_text())
    blob_dir = src / "blobs" / "sha256"
    layers = [LayerBlob(path=str(blob_dir / layer["digest"].split(":", 1)[1]),
                        digest=layer["digest"], size=int(layer["size"]),
                        diff_id=layer["diff_id"],
                        uncompressed_size=int(layer["uncompressed_size"]),
                        media_type=desc["mediaType"])
              for layer, desc in zip(info["layers"], manifest["layers"], strict=True)]
    out = base / "images/a"
    out.mkdir(parents=True, exist_ok=True)
    image = BenchImage(
        name="a", repo="bench/a", tag="v1",
        description="the test suite's Debian bookworm minbase + python3, 3 gzip layers "
                    "(deletions, an opaque dir, a dir replaced by a file)",
        compression="gzip", layers=layers, config_path=str(src / "config.json"),
        config_digest=manifest["config"]["digest"],
        entries=len(listing),
        tree_bytes=sum(e["size"] or 0 for e in listing if e["type"] == "file"),
        manifest=manifest)
    image.save(out / "image.json")
    return image


BUILDERS: dict[str, Callable[[Path, IO[str]], Any]] = {
    "a": build_debian_small,
    "b": build_big, "c": build_big,
    "d": build_tiny,
    "b2x": build_b2x,
    "l1": lambda base, log: build_layer_split(base, 1, log),
    "l4": lambda base, log: build_layer_split(base, 4, log),
    "l16": lambda base, log: build_layer_split(base, 16, log),
}
ALL_IMAGES = list(BUILDERS)


def ensure_built(name: str, base: Path | None = None, log: IO[str] | None = None) -> BenchImage:
    """The built image ``name``, building it (and what it derives from) on first use."""
    if name not in BUILDERS:
        raise ValueError(f"unknown image {name!r}; known: {', '.join(ALL_IMAGES)}")
    base = base or bench_dir()
    meta = base / "images" / name / "image.json"
    # Image a is only described from the test suite's cache, which may have been rebuilt.
    if meta.exists() and name != "a":
        return BenchImage.load(meta)
    base.mkdir(parents=True, exist_ok=True)
    own_log = log is None
    logf = log or open(base / "build.log", "a")  # noqa: SIM115 - closed below
    try:
        t0 = time.monotonic()
        print(f"bench: building image {name} (log: {base / 'build.log'})", flush=True)
        built = BUILDERS[name](base, logf)
        image = built[name] if isinstance(built, dict) else built
        print(f"bench: image {name} built in {time.monotonic() - t0:.0f}s: "
              f"{len(image.layers)} layers, {image.compressed_bytes / 1e6:.0f} MB compressed, "
              f"{image.tree_bytes / 1e6:.0f} MB in {image.entries} entries", flush=True)
        return image
    finally:
        if own_log:
            logf.close()


def check_output(cmd: list[str], timeout: float = 60) -> str:
    return run_checked(cmd, timeout=timeout, text=True).stdout
