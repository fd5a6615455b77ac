"""Typed descriptors, manifests, platforms and image configs (pure parsing, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64/v8`` -> Platform; raises ConfigError on bad syntax."""
        raise NotImplementedError

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (``linux/amd64``, ``linux/arm64/v8``...)."""
        raise NotImplementedError

    def matches(self, offered: Platform) -> bool:
        """True if an index entry for ``offered`` can serve a request for ``self``."""
        raise NotImplementedError

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
        return d


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
            "layers": [dict(l.to_dict(), diff_id=d) for l, d in
                       zip(self.layers, self.config.diff_ids or [None] * len(self.layers), strict=False)],
            "config": self.config.runtime_dict(),
        }
