"""Typed descriptors, manifests, platforms and image configs (pure parsing, no I/O)."""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ConfigError, PlatformNotFound, RegistryError, UnsupportedManifest
from worker.pull.reference import is_valid_digest

# Media types we accept.
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MANIFEST_ACCEPT = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
LAYER_TYPES = (DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN, OCI_LAYER_TAR, OCI_LAYER_GZIP,
               OCI_LAYER_ZSTD, OCI_LAYER_ND_TAR, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD,
               # older/alternative spellings seen in the wild
               "application/vnd.docker.image.rootfs.diff.tar",
               "application/vnd.docker.image.rootfs.diff.tar.zstd",
               "application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
FOREIGN_LAYER_TYPES = (DOCKER_LAYER_FOREIGN, OCI_LAYER_ND_TAR, OCI_LAYER_ND_GZIP,
                       OCI_LAYER_ND_ZSTD)

# uname -m / Go GOARCH aliases -> the names registries use
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386", "x86": "386"}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64/v8`` -> Platform; raises ConfigError on bad syntax."""
        parts = text.strip().lower().split("/") if isinstance(text, str) else []
        if len(parts) not in (2, 3) or not all(parts) or \
                not all(p.replace("_", "").replace("-", "").replace(".", "").isalnum()
                        for p in parts):
            raise ConfigError(f"invalid platform {text!r}: expected os/architecture[/variant], "
                              "for example linux/amd64 or linux/arm64/v8")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, obj: Any) -> Platform | None:
        """Platform from a descriptor's or config's JSON object (None if absent)."""
        if not isinstance(obj, dict):
            return None
        os_ = obj.get("os") or ""
        arch = obj.get("architecture") or ""
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        variant = obj.get("variant") or None
        return cls(os_, arch, variant if isinstance(variant, str) else None)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (``linux/amd64``, ``linux/arm64/v8``...)."""
        machine = _platform.machine().lower()
        if machine.startswith("armv"):
            # armv7l -> arm/v7, armv6l -> arm/v6
            digits = "".join(c for c in machine[4:] if c.isdigit())
            return cls("linux", "arm", f"v{digits}" if digits else None)
        arch = _ARCH_ALIASES.get(machine, machine)
        return cls("linux", arch, "v8" if arch == "arm64" else None)

    @property
    def is_unknown(self) -> bool:
        """Attestation manifests in indexes are marked ``unknown/unknown``."""
        return self.os == "unknown" or self.architecture == "unknown"

    def matches(self, offered: Platform) -> bool:
        """True if an index entry for ``offered`` can serve a request for ``self``."""
        if offered.is_unknown:
            return False
        if self.os != offered.os:
            return False
        arch = _ARCH_ALIASES.get(offered.architecture, offered.architecture)
        if self.architecture != arch:
            return False
        if arch == "amd64" or self.variant is None:
            # amd64 microarchitecture levels (v2, v3) all run amd64 code; no variant asked
            # means any variant will do (selection prefers the best one).
            return True
        if arch == "arm64":
            return (offered.variant or "v8") == (self.variant or "v8")
        return offered.variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.platform:
            d["platform"] = str(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        """Inverse of :meth:`to_dict`."""
        return cls(media_type=d["mediaType"], digest=d["digest"], size=int(d["size"]),
                   urls=tuple(d.get("urls") or ()),
                   platform=Platform.parse(d["platform"]) if d.get("platform") else None,
                   annotations=tuple(sorted((d.get("annotations") or {}).items())))

    @classmethod
    def from_json(cls, obj: Any, *, what: str, image: str | None = None) -> Descriptor:
        """A descriptor as found in a manifest or index; raises UnsupportedManifest if malformed."""
        if not isinstance(obj, dict):
            raise UnsupportedManifest(f"{what}: descriptor is not an object", image=image)
        media_type = obj.get("mediaType", "")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(digest, str) or not is_valid_digest(digest):
            raise UnsupportedManifest(f"{what}: invalid or unsupported digest {digest!r} "
                                      "(expected sha256:<64 hex>)", image=image)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsupportedManifest(f"{what}: invalid size {size!r} for {digest}", image=image)
        if not isinstance(media_type, str):
            raise UnsupportedManifest(f"{what}: invalid mediaType for {digest}", image=image)
        urls = obj.get("urls") or ()
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            urls = ()
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            annotations = {}
        return cls(media_type=media_type, digest=digest, size=size, urls=tuple(urls),
                   platform=Platform.from_json(obj.get("platform")),
                   annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())))


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What a VM needs to start the workload, plus the layer diff_ids for verification."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    diff_ids: tuple[str, ...] = ()
    os: str = ""
    architecture: str = ""
    variant: str | None = None

    def runtime_dict(self) -> dict[str, Any]:
        """The JSON shape used in ``inspect``, ``--json`` results, sidecars and the API."""
        return {
            "Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "Cmd": list(self.cmd) if self.cmd is not None else None,
            "Env": list(self.env),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "ExposedPorts": list(self.exposed_ports),
            "Labels": dict(self.labels),
        }

    @property
    def platform(self) -> Platform | None:
        return Platform(self.os, self.architecture, self.variant) if self.os and self.architecture \
            else None


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """A reference resolved to one platform's manifest and its config."""

    reference: str           # normalised reference as given (tag and/or digest)
    manifest_digest: str     # digest of the platform manifest (not the index)
    index_digest: str | None  # digest of the index/list it was selected from, if any
    media_type: str
    platform: Platform
    config_descriptor: Descriptor
    config: ImageConfig
    layers: tuple[Descriptor, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON printed by ``rootfs-export inspect``."""
        return {
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "index_digest": self.index_digest,
            "media_type": self.media_type,
            "platform": str(self.platform),
            "config_digest": self.config_descriptor.digest,
            "layers": [dict(desc.to_dict(), diff_id=d) for desc, d in
                       zip(self.layers, self.config.diff_ids or [None] * len(self.layers), strict=False)],
            "config": self.config.runtime_dict(),
            # The rest makes the dict a lossless serialisation (Celery passes it between tasks).
            "config_descriptor": self.config_descriptor.to_dict(),
            "diff_ids": list(self.config.diff_ids),
            "config_platform": {"os": self.config.os, "architecture": self.config.architecture,
                                "variant": self.config.variant},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResolvedImage:
        """Inverse of :meth:`to_dict`."""
        rc = d.get("config") or {}
        cp = d.get("config_platform") or {}
        config = ImageConfig(
            entrypoint=tuple(rc["Entrypoint"]) if rc.get("Entrypoint") is not None else None,
            cmd=tuple(rc["Cmd"]) if rc.get("Cmd") is not None else None,
            env=tuple(rc.get("Env") or ()), working_dir=rc.get("WorkingDir") or "",
            user=rc.get("User") or "", exposed_ports=tuple(rc.get("ExposedPorts") or ()),
            labels=dict(rc.get("Labels") or {}), diff_ids=tuple(d.get("diff_ids") or ()),
            os=cp.get("os") or "", architecture=cp.get("architecture") or "",
            variant=cp.get("variant"))
        layers = tuple(Descriptor.from_dict({k: v for k, v in ld.items() if k != "diff_id"})
                       for ld in d["layers"])
        return cls(reference=d["reference"], manifest_digest=d["manifest_digest"],
                   index_digest=d.get("index_digest"), media_type=d["media_type"],
                   platform=Platform.parse(d["platform"]),
                   config_descriptor=Descriptor.from_dict(d["config_descriptor"]),
                   config=config, layers=layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ResolvedImage:
        return cls.from_dict(json.loads(text))


# -- parsing registry documents --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ImageManifest:
    """A single-platform manifest (Docker schema2 or OCI)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ImageIndex:
    """A multi-platform index (OCI index or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def _load_json(data: bytes, what: str, image: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedManifest(f"{what} is not valid JSON: {exc}", image=image) from None
    if not isinstance(obj, dict):
        raise UnsupportedManifest(f"{what} is not a JSON object", image=image)
    return obj


def parse_manifest(data: bytes, content_type: str | None = None, *,
                   image: str | None = None) -> ImageManifest | ImageIndex:
    """Parse a manifest or index body; the ``mediaType`` field wins over ``Content-Type``.

    Schema1 and unknown types raise :class:`UnsupportedManifest` with a clear message.
    """
    what = f"manifest of {image}" if image else "manifest"
    obj = _load_json(data, what, image)
    ct = (content_type or "").split(";")[0].strip().lower()
    media_type = obj.get("mediaType") if isinstance(obj.get("mediaType"), str) else None
    schema = obj.get("schemaVersion")
    if schema == 1 or ct in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or \
            media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raise UnsupportedManifest(
            f"{image or 'image'}: the registry serves a Docker schema1 manifest, an obsolete "
            "format that is not supported; push the image again with a current Docker/BuildKit "
            "or skopeo so it gets a schema2 or OCI manifest", image=image)
    if schema != 2:
        raise UnsupportedManifest(f"{what}: unsupported schemaVersion {schema!r}", image=image)
    if media_type is None:
        if ct in MANIFEST_ACCEPT:
            media_type = ct
        elif "manifests" in obj:
            media_type = OCI_INDEX
        elif "layers" in obj and "config" in obj:
            media_type = OCI_MANIFEST
        else:
            raise UnsupportedManifest(f"{what}: cannot tell the manifest type (no mediaType; "
                                      f"Content-Type {content_type!r})", image=image)
    if media_type in INDEX_TYPES:
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise UnsupportedManifest(f"{what}: index without a 'manifests' list", image=image)
        return ImageIndex(media_type, tuple(Descriptor.from_json(e, what=what, image=image)
                                            for e in entries))
    if media_type in IMAGE_MANIFEST_TYPES:
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise UnsupportedManifest(f"{what}: manifest without a 'layers' list", image=image)
        config = Descriptor.from_json(obj.get("config"), what=f"{what} (config)", image=image)
        descs = tuple(Descriptor.from_json(e, what=f"{what} (layer {i})", image=image)
                      for i, e in enumerate(layers))
        for i, d in enumerate(descs):
            if d.media_type and d.media_type not in LAYER_TYPES:
                raise UnsupportedManifest(f"{what}: layer {i} ({d.digest}) has unsupported media "
                                          f"type {d.media_type!r}", image=image)
        ann = obj.get("annotations") or {}
        annotations = tuple(sorted((str(k), str(v)) for k, v in ann.items())) \
            if isinstance(ann, dict) else ()
        return ImageManifest(media_type, config, descs, annotations)
    raise UnsupportedManifest(f"{what}: unsupported media type {media_type!r} (this is not a "
                              "container image, or a format we do not know)", image=image)


def _str_tuple(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return None


def parse_config(data: bytes, *, image: str | None = None) -> ImageConfig:
    """Parse an image config blob (Docker or OCI config JSON)."""
    obj = _load_json(data, f"config of {image}" if image else "image config", image)
    cfg = obj.get("config") or obj.get("container_config") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    rootfs = obj.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise UnsupportedManifest(f"config of {image or 'image'} has no rootfs.diff_ids list",
                                  image=image)
    for d in diff_ids:
        if not is_valid_digest(d):
            raise UnsupportedManifest(f"config of {image or 'image'}: invalid diff_id {d!r}",
                                      image=image)
    ports = cfg.get("ExposedPorts") or {}
    labels = cfg.get("Labels") or {}
    return ImageConfig(
        entrypoint=_str_tuple(cfg.get("Entrypoint")),
        cmd=_str_tuple(cfg.get("Cmd")),
        env=_str_tuple(cfg.get("Env")) or (),
        working_dir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        exposed_ports=tuple(sorted(str(p) for p in ports)) if isinstance(ports, dict) else (),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        diff_ids=tuple(diff_ids),
        os=str(obj.get("os") or ""),
        architecture=str(obj.get("architecture") or ""),
        variant=str(obj["variant"]) if obj.get("variant") else None,
    )


def _variant_rank(wanted: Platform, offered: Platform) -> int:
    """Lower is better, among entries that already match."""
    if offered.variant == wanted.variant:
        return 0
    if wanted.architecture == "arm64" and (offered.variant or "v8") == (wanted.variant or "v8"):
        return 1
    if wanted.variant is None and wanted.architecture == "arm":
        # Docker's default for arm is v7, then lower ones.
        order = {"v7": 2, "v6": 3, "v5": 4}
        return order.get(offered.variant or "", 5)
    if wanted.architecture == "amd64" and offered.variant in (None, "v1"):
        return 1
    return 6


def select_platform(index: ImageIndex, wanted: Platform, *, image: str) -> Descriptor:
    """Pick the manifest for ``wanted`` from ``index``, skipping attestation entries.

    Raises :class:`PlatformNotFound` listing what the index offers.
    """
    candidates: list[tuple[int, int, Descriptor]] = []
    offered: list[str] = []
    for pos, desc in enumerate(index.manifests):
        if desc.platform is None or desc.platform.is_unknown:
            continue
        if dict(desc.annotations).get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        if desc.media_type and desc.media_type not in MANIFEST_ACCEPT:
            continue
        offered.append(str(desc.platform))
        if wanted.matches(desc.platform):
            candidates.append((_variant_rank(wanted, desc.platform), pos, desc))
    if not candidates:
        raise PlatformNotFound(image, str(wanted), sorted(set(offered)))
    candidates.sort(key=lambda c: (c[0], c[1]))
    return candidates[0][2]


def check_manifest_size(size: int, limit: int, *, image: str) -> None:
    if size > limit:
        raise RegistryError(f"{image}: manifest of {size} bytes exceeds the limit of {limit} "
                            "(ROOTFS_EXPORT_MAX_MANIFEST_BYTES)", image=image)
