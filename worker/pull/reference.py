"""Image references with Docker's normalisation rules.

``alpine`` -> ``docker.io/library/alpine:latest``; a first component containing ``.`` or ``:``
or equal to ``localhost`` is a registry host; ``name@sha256:...`` pins a digest (with a tag too,
the digest wins). The API host for ``docker.io`` is ``registry-1.docker.io``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# Names people use for Docker Hub that all mean docker.io.
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# The distribution reference grammar (github.com/distribution/reference/regexp.go).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_NAME_LENGTH = 255

DIGEST_RE = _DIGEST


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

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_valid_digest(digest: str) -> bool:
    """True for ``sha256:`` followed by 64 lowercase hex digits (the only kind we verify)."""
    return bool(_DIGEST.fullmatch(digest))


def _valid_host(host: str) -> bool:
    if host.startswith("["):
        addr, bracket, rest = host.partition("]")
        if not bracket or not _IPV6.fullmatch(addr + "]"):
            return False
    else:
        addr, _, _ = host.partition(":")
        rest = host[len(addr):]
        if not addr or not all(_HOST_LABEL.fullmatch(label) for label in addr.split(".")):
            return False
    return rest == "" or (rest.startswith(":") and bool(_PORT.fullmatch(rest[1:])))


def _looks_like_host(component: str) -> bool:
    # Docker's rule: a dot, a colon, "localhost", or an upper-case letter (repository
    # names are lower-case, so "Host/app" can only be a host).
    return ("." in component or ":" in component or component == "localhost"
            or component.lower() != component)


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference(str(text), "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(text, "contains whitespace")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidReference(text, f"a reference has no scheme; drop the '{scheme}://' part")
    if not text.isascii():
        bad = next(c for c in text if not c.isascii())
        raise InvalidReference(text, f"non-ASCII character {bad!r} (registry hosts, repository "
                                     "names, tags and digests are ASCII)")

    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if "@" in digest:
            raise InvalidReference(text, "more than one '@'")
        if not _DIGEST.fullmatch(digest):
            if _ANY_DIGEST.fullmatch(digest) and not digest.startswith("sha256:"):
                raise InvalidReference(text, f"unsupported digest algorithm in {digest!r} "
                                             "(only sha256 is supported)")
            raise InvalidReference(text, f"invalid digest {digest!r} "
                                         "(expected sha256: followed by 64 lowercase hex digits)")

    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(text, f"invalid tag {tag!r} (letters, digits, '_', '.', '-'; "
                                         "at most 128 characters; not starting with '.' or '-')")

    if not rest:
        raise InvalidReference(text, "missing repository name")
    first, sep, remainder = rest.partition("/")
    if sep and _looks_like_host(first):
        registry, path = first, remainder
        if not _valid_host(registry):
            raise InvalidReference(text, f"invalid registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, rest
    if registry.lower() in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not path:
        raise InvalidReference(text, "missing repository name after the registry host")
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path

    for comp in path.split("/"):
        if not comp:
            raise InvalidReference(text, "empty path component in the repository name")
        if not _COMPONENT.fullmatch(comp):
            if _COMPONENT.fullmatch(comp.lower()):
                raise InvalidReference(text, "repository name must be lowercase")
            raise InvalidReference(text, f"invalid repository name component {comp!r} "
                                         "(lowercase letters, digits and single separators "
                                         "'.', '_', '__', '-')")
    if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(text, f"repository name longer than {MAX_NAME_LENGTH} characters")

    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
