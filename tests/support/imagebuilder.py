"""Build real OCI / Docker images from entry lists and push them over the distribution API.

Everything here produces genuine bytes: tars written by :mod:`tarfile` (or GNU tar for sparse
members), gzip/zstd blobs, image configs and manifests, uploaded with ``requests`` through the
registry's blob upload and manifest PUT endpoints. Hostile tests rely on names being written
exactly as given (``../x``, ``/abs``, raw non-UTF-8 bytes), so nothing is normalised.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urljoin

import requests
import zstandard

# -- media types ----------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    # Docker schema2 has no zstd type of its own; moby writes the OCI one into docker manifests.
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.docker.image.rootfs.diff.tar",
}
SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"
IN_TOTO = "application/vnd.in-toto+json"

Compression = Literal["gzip", "zstd", "none"]
Schema = Literal["oci", "docker"]

DEFAULT_MTIME = 1700000000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- tar building ------------------------------------------------------------------------------
_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES = {"file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644,
                  "char": 0o666, "block": 0o660, "fifo": 0o644}


@dataclass
class TarEntry:
    """One tar member. ``kind``: file, dir, symlink, hardlink, char, block or fifo.

    ``linkname`` is the target of symlinks and hardlinks. ``name_bytes`` replaces ``path`` with
    raw bytes (for non-UTF-8 names). ``mode`` None means 0644 files, 0755 dirs, 0777 symlinks.
    """

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = DEFAULT_MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    name_bytes: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown TarEntry kind {self.kind!r} (one of {sorted(_KINDS)})")


def file(path: str, data: bytes | str = b"", **kw: Any) -> TarEntry:
    """Shorthand for a regular file entry (``str`` data is UTF-8 encoded)."""
    return TarEntry(path, "file", data.encode() if isinstance(data, str) else data, **kw)


def directory(path: str, **kw: Any) -> TarEntry:
    return TarEntry(path, "dir", **kw)


def symlink(path: str, target: str, **kw: Any) -> TarEntry:
    return TarEntry(path, "symlink", linkname=target, **kw)


def hardlink(path: str, target: str, **kw: Any) -> TarEntry:
    return TarEntry(path, "hardlink", linkname=target, **kw)


def whiteout(path: str) -> TarEntry:
    """The entry that deletes ``path`` from lower layers: an empty file ``dir/.wh.NAME``."""
    path = path.rstrip("/")
    head, _, name = path.rpartition("/")
    return TarEntry(f"{head}/.wh.{name}" if head else f".wh.{name}", "file")


def opaque(dirpath: str) -> TarEntry:
    """The marker making ``dirpath`` opaque: ``dirpath/.wh..wh..opq``."""
    dirpath = dirpath.rstrip("/")
    return TarEntry(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq", "file")


_TAR_FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def _surrogate(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _tarinfo(entry: TarEntry, fmt: str) -> tarfile.TarInfo:
    name = _surrogate(entry.name_bytes) if entry.name_bytes is not None else entry.path
    info = tarfile.TarInfo(name)
    info.type = _KINDS[entry.kind]
    info.mode = entry.mode if entry.mode is not None else _DEFAULT_MODES[entry.kind]
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime
    info.linkname = entry.linkname
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = len(entry.data) if entry.kind == "file" else 0
    if entry.xattrs:
        if fmt != "pax":
            raise ValueError(f"{entry.path}: xattrs need format='pax' (got {fmt!r})")
        info.pax_headers = {f"SCHILY.xattr.{k}": _surrogate(v) for k, v in entry.xattrs.items()}
    return info


#: called with every tar built here (tests/conftest.py compares the two layer indexers on
#: each one); empty outside the test session
TAR_HOOKS: list[Callable[[bytes], None]] = []


def _built(tar: bytes) -> bytes:
    for hook in TAR_HOOKS:
        hook(tar)
    return tar


def make_tar(entries: list[TarEntry], format: str = "pax") -> bytes:
    """A tar of ``entries`` in order, names exactly as given. format: pax, gnu or ustar."""
    if format not in _TAR_FORMATS:
        raise ValueError(f"unknown tar format {format!r}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=_TAR_FORMATS[format],
                      encoding="utf-8", errors="surrogateescape") as tar:
        for entry in entries:
            info = _tarinfo(entry, format)
            if entry.kind == "file":
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                if entry.data:
                    raise ValueError(f"{entry.path}: only files carry data")
                tar.addfile(info)
    return _built(buf.getvalue())


def tar_end_offset(tar: bytes) -> int:
    """Offset just past the last member's data (where the end-of-archive zero blocks start)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        tf.getmembers()
        return tf.offset


def concat_tars(*tars: bytes) -> bytes:
    """Join tars into one archive (members in order), e.g. a sparse member with make_tar()."""
    body = b"".join(t[: tar_end_offset(t)] for t in tars)
    return _built(body + b"\0" * 1024)


def sparse_tar(path: str, size: int, chunks: list[tuple[int, bytes]], format: str = "posix",
               *, mode: int = 0o644, mtime: int = DEFAULT_MTIME) -> bytes:
    """A tar holding one sparse file ``path`` of ``size`` bytes written by GNU ``tar --sparse``.

    ``chunks`` are ``(offset, data)`` pieces of real content; the rest are holes.
    ``format``: "posix" (PAX, GNU sparse 1.0) or "gnu" (old GNU sparse headers).
    """
    if format not in ("posix", "gnu"):
        raise ValueError("sparse_tar format must be 'posix' or 'gnu'")
    rel = path.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="sparse-") as tmp:
        target = Path(tmp, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.truncate(size)
            for offset, data in chunks:
                if offset + len(data) > size:
                    raise ValueError("sparse chunk beyond the file size")
                fh.seek(offset)
                fh.write(data)
        os.chmod(target, mode)
        cmd = ["tar", "--create", "--file=-", "--sparse", f"--format={format}",
               "--numeric-owner", "--owner=0", "--group=0", f"--mtime=@{mtime}",
               "-C", tmp]
        if format == "posix":
            cmd += ["--sparse-version=1.0", "--pax-option=delete=atime,delete=ctime"]
        cmd.append(rel)
        return _built(subprocess.run(cmd, check=True, capture_output=True).stdout)


def compress(data: bytes, compression: str) -> bytes:
    """Compress ``data`` with "gzip", "zstd" or "none" (deterministic output)."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


# -- images --------------------------------------------------------------------------------------
@dataclass
class Layer:
    """A layer: its uncompressed tar, how to compress it, and optionally a (lying) media type."""

    tar: bytes
    compression: str = "gzip"
    media_type: str | None = None

    def __post_init__(self) -> None:
        _built(self.tar)

    @classmethod
    def from_entries(cls, entries: list[TarEntry], compression: str = "gzip",
                     format: str = "pax") -> Layer:
        return cls(make_tar(entries, format), compression)

    @cached_property
    def blob(self) -> bytes:
        return compress(self.tar, self.compression)

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    def media_type_for(self, schema: str) -> str:
        if self.media_type is not None:
            return self.media_type
        table = OCI_LAYER if schema == "oci" else DOCKER_LAYER
        return table[self.compression]


@dataclass
class PushedImage:
    reference: str  # "127.0.0.1:PORT/repo:tag", or "...@sha256:..." when pushed without a tag
    manifest_digest: str
    manifest: dict
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    layers: list[Layer]
    # extras
    repo: str = ""
    tag: str | None = None
    registry_host: str = ""
    media_type: str = ""
    manifest_bytes: bytes = b""
    config: dict = field(default_factory=dict)
    config_bytes: bytes = b""
    platform: str = ""

    @property
    def digest_reference(self) -> str:
        return f"{self.registry_host}/{self.repo}@{self.manifest_digest}"


@dataclass
class PushedIndex:
    reference: str
    digest: str
    index: dict
    # extras
    repo: str = ""
    tag: str | None = None
    registry_host: str = ""
    media_type: str = ""
    index_bytes: bytes = b""
    attestation_digests: list[str] = field(default_factory=list)

    @property
    def digest_reference(self) -> str:
        return f"{self.registry_host}/{self.repo}@{self.digest}"


@dataclass
class PushedManifest:
    reference: str
    digest: str
    media_type: str
    body: bytes


class RegistryLike(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def host(self) -> str: ...


def host_platform() -> str:
    """The host's platform in OCI terms, e.g. "linux/amd64" or "linux/arm64"."""
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
        "armv7l": "arm/v7", "armv6l": "arm/v6", "i686": "386", "i386": "386",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
    }.get(machine, machine)
    return f"linux/{arch}"


def parse_platform(text: str) -> dict[str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {text!r}")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def _session(registry: RegistryLike) -> requests.Session:
    s = requests.Session()
    user, password = getattr(registry, "username", None), getattr(registry, "password", None)
    if user is not None and password is not None:
        s.auth = (user, password)
    return s


def _check(resp: requests.Response, what: str) -> requests.Response:
    if resp.status_code >= 300:
        raise RuntimeError(f"{what}: HTTP {resp.status_code} {resp.text[:500]}")
    return resp


def blob_exists(registry: RegistryLike, repo: str, digest: str) -> bool:
    with _session(registry) as s:
        resp = s.head(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=30)
        return resp.status_code == 200


def _start_upload(s: requests.Session, registry: RegistryLike, repo: str,
                  digest: str) -> str | None:
    """The upload URL for blob ``digest`` in ``repo``, or None when the registry has it."""
    if s.head(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=30).status_code == 200:
        return None
    resp = _check(s.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=30),
                  f"start blob upload to {repo}")
    return urljoin(registry.url + "/", resp.headers["Location"])


def push_blob(registry: RegistryLike, repo: str, data: bytes, digest: str | None = None) -> str:
    """Upload ``data`` (monolithic POST + PUT) unless the registry has it; return its digest.

    ``digest`` may be given to upload under a lying digest; the registry will reject that.
    """
    digest = digest or sha256_digest(data)
    with _session(registry) as s:
        location = _start_upload(s, registry, repo, digest)
        if location is None:
            return digest
        _check(s.put(location, params={"digest": digest}, data=data, timeout=300,
                     headers={"Content-Type": "application/octet-stream"}),
               f"upload blob {digest} to {repo}")
    return digest


def push_blob_file(registry: RegistryLike, repo: str, path: str | os.PathLike[str],
                   digest: str) -> str:
    """Upload the file at ``path`` (streamed, not read into memory) unless already there."""
    with _session(registry) as s:
        location = _start_upload(s, registry, repo, digest)
        if location is None:
            return digest
        with open(path, "rb") as fh:
            _check(s.put(location, params={"digest": digest}, data=fh, timeout=600,
                         headers={"Content-Type": "application/octet-stream",
                                  "Content-Length": str(os.fstat(fh.fileno()).st_size)}),
                   f"upload blob {digest} from {path} to {repo}")
    return digest


def push_manifest_bytes(registry: RegistryLike, repo: str, ref: str, body: bytes,
                        media_type: str) -> str:
    """PUT ``body`` as a manifest at ``ref`` (tag or digest); return the registry's digest."""
    with _session(registry) as s:
        resp = _check(s.put(f"{registry.url}/v2/{repo}/manifests/{ref}", data=body, timeout=60,
                            headers={"Content-Type": media_type}),
                      f"push manifest {repo}:{ref} ({media_type})")
    return resp.headers.get("Docker-Content-Digest") or sha256_digest(body)


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=False).encode()


def _reference(registry: RegistryLike, repo: str, tag: str | None, digest: str) -> str:
    return f"{registry.host}/{repo}:{tag}" if tag else f"{registry.host}/{repo}@{digest}"


def build_config(layers: list[Layer], *, config: dict | None = None,
                 platform: str | None = None, diff_ids: list[str] | None = None) -> dict:
    """The image config JSON (OCI and Docker share it) for ``layers``."""
    plat = parse_platform(platform or host_platform())
    image_config: dict[str, Any] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    }
    image_config.update(config or {})
    doc: dict[str, Any] = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": plat["architecture"],
        "os": plat["os"],
    }
    if "variant" in plat:
        doc["variant"] = plat["variant"]
    doc["config"] = image_config
    doc["rootfs"] = {"type": "layers",
                     "diff_ids": diff_ids if diff_ids is not None else [layer.diff_id for layer in layers]}
    doc["history"] = [{"created": "2023-11-14T22:13:20Z", "created_by": f"test layer {i}"}
                      for i in range(len(layers))]
    return doc


def push_image(registry: RegistryLike, repo: str, tag: str | None, layers: list[Layer], *,
               schema: str = "oci", config: dict | None = None, platform: str | None = None,
               diff_ids: list[str] | None = None,
               annotations: dict[str, str] | None = None) -> PushedImage:
    """Push ``layers`` + a config + a manifest; ``tag`` None pushes by digest only.

    ``config`` is merged into the image config's "config" (Entrypoint, Cmd, Env, ...).
    ``diff_ids`` overrides the config's rootfs.diff_ids (to make them lie).
    """
    if schema not in ("oci", "docker"):
        raise ValueError(f"schema must be 'oci' or 'docker', got {schema!r}")
    plat = platform or host_platform()
    config_doc = build_config(layers, config=config, platform=plat, diff_ids=diff_ids)
    config_bytes = _encode(config_doc)
    config_digest = push_blob(registry, repo, config_bytes)
    layer_digests = [push_blob(registry, repo, layer.blob) for layer in layers]
    media_type = OCI_MANIFEST if schema == "oci" else DOCKER_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": OCI_CONFIG if schema == "oci" else DOCKER_CONFIG,
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type_for(schema), "digest": d, "size": layer.size}
                   for layer, d in zip(layers, layer_digests, strict=True)],
    }
    if annotations:
        manifest["annotations"] = annotations
    body = _encode(manifest)
    digest = sha256_digest(body)
    push_manifest_bytes(registry, repo, tag or digest, body, media_type)
    return PushedImage(
        reference=_reference(registry, repo, tag, digest), manifest_digest=digest,
        manifest=manifest, config_digest=config_digest, layer_digests=layer_digests,
        diff_ids=list(config_doc["rootfs"]["diff_ids"]), layers=list(layers), repo=repo,
        tag=tag, registry_host=registry.host, media_type=media_type, manifest_bytes=body,
        config=config_doc, config_bytes=config_bytes, platform=plat,
    )


def _push_attestation(registry: RegistryLike, repo: str, image: PushedImage) -> tuple[str, int]:
    """A buildkit-style attestation manifest (in-toto SPDX statement) for ``image``."""
    statement = _encode({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": image.reference,
                     "digest": {"sha256": image.manifest_digest.split(":", 1)[1]}}],
        "predicate": {"spdxVersion": "SPDX-2.3", "packages": []},
    })
    statement_digest = push_blob(registry, repo, statement)
    config_bytes = _encode({"architecture": "unknown", "os": "unknown", "config": {},
                            "rootfs": {"type": "layers",
                                       "diff_ids": [sha256_digest(statement)]}})
    config_digest = push_blob(registry, repo, config_bytes)
    body = _encode({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": IN_TOTO, "digest": statement_digest, "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}],
    })
    digest = sha256_digest(body)
    push_manifest_bytes(registry, repo, digest, body, OCI_MANIFEST)
    return digest, len(body)


def push_index(registry: RegistryLike, repo: str, tag: str | None, images: list[PushedImage], *,
               schema: str = "oci", attestation: bool = False) -> PushedIndex:
    """Push an OCI index (schema "oci") or Docker manifest list ("docker") over ``images``.

    Each image must already be in ``repo`` (push it with tag None). ``attestation=True`` adds,
    per image, a buildkit-style attestation manifest with platform unknown/unknown.
    """
    media_type = OCI_INDEX if schema == "oci" else DOCKER_MANIFEST_LIST
    manifests: list[dict[str, Any]] = []
    attestations: list[str] = []
    for image in images:
        if image.repo and image.repo != repo:
            raise ValueError(f"image {image.reference} is in repo {image.repo!r}, not {repo!r}")
        manifests.append({
            "mediaType": image.media_type or image.manifest.get("mediaType", OCI_MANIFEST),
            "digest": image.manifest_digest,
            "size": len(image.manifest_bytes) if image.manifest_bytes else
            len(_encode(image.manifest)),
            "platform": parse_platform(image.platform or host_platform()),
        })
    if attestation:
        for image in images:
            digest, size = _push_attestation(registry, repo, image)
            attestations.append(digest)
            manifests.append({
                "mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {"vnd.docker.reference.digest": image.manifest_digest,
                                "vnd.docker.reference.type": "attestation-manifest"},
            })
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    body = _encode(index)
    digest = sha256_digest(body)
    push_manifest_bytes(registry, repo, tag or digest, body, media_type)
    return PushedIndex(reference=_reference(registry, repo, tag, digest), digest=digest,
                       index=index, repo=repo, tag=tag, registry_host=registry.host,
                       media_type=media_type, index_bytes=body,
                       attestation_digests=attestations)


def push_raw_manifest(registry: RegistryLike, repo: str, tag: str | None, body: bytes,
                      media_type: str) -> PushedManifest:
    """PUT arbitrary manifest bytes; raises RuntimeError with the registry's answer on refusal.

    The registry validates what it stores (referenced blobs must exist, schema1 needs a
    signature), so manifests it refuses must come from a deliberately misbehaving server.
    """
    digest = sha256_digest(body)
    push_manifest_bytes(registry, repo, tag or digest, body, media_type)
    return PushedManifest(reference=_reference(registry, repo, tag, digest), digest=digest,
                          media_type=media_type, body=body)


# -- registry-side helpers for failure tests -----------------------------------------------------
def fetch_manifest(registry: RegistryLike, repo: str, ref: str,
                   accept: str | None = None) -> requests.Response:
    accept = accept or ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
    with _session(registry) as s:
        return s.get(f"{registry.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept},
                     timeout=30)


def fetch_blob(registry: RegistryLike, repo: str, digest: str) -> bytes:
    with _session(registry) as s:
        return _check(s.get(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=300),
                      f"fetch blob {digest}").content


def delete_blob(registry: RegistryLike, repo: str, digest: str) -> None:
    """DELETE a blob from ``repo`` (the test registries run with deletes enabled)."""
    with _session(registry) as s:
        _check(s.delete(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=30),
               f"delete blob {digest}")


def blob_data_path(registry: Any, digest: str) -> Path:
    """Where a RegistryProcess's filesystem storage keeps the bytes of ``digest``."""
    algo, hexpart = digest.split(":", 1)
    return (Path(registry.storage_dir) / "docker/registry/v2/blobs" / algo / hexpart[:2] /
            hexpart / "data")


def corrupt_blob(registry: Any, digest: str, data: bytes) -> None:
    """Replace the stored bytes of ``digest`` so the registry serves content that lies."""
    path = blob_data_path(registry, digest)
    if not path.exists():
        raise FileNotFoundError(f"blob {digest} not in registry storage {path}")
    path.write_bytes(data)
