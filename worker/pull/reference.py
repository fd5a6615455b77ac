"""Image references with Docker's normalisation rules.

``alpine`` -> ``docker.io/library/alpine:latest``; a first component containing ``.`` or ``:``
or equal to ``localhost`` is a registry host; ``name@sha256:...`` pins a digest (with a tag too,
the digest wins). The API host for ``docker.io`` is ``registry-1.docker.io``.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str          # "docker.io", "localhost:5000", "ghcr.io"
    repository: str        # "library/alpine"
    tag: str | None        # "latest" when neither tag nor digest was given
    digest: str | None     # "sha256:<64 hex>"

    @property
    def api_host(self) -> str:
        """Host (with port) that serves the distribution API for this registry."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` saying what is wrong."""
    raise InvalidReference(text, "not implemented yet")
