"""The exceptions rootfs-export raises, each carrying the facts a user needs to act.

Every error a user can cause (bad reference, lying registry, hostile layer, full disk) is a
:class:`RootfsExportError`; anything else escaping the engine is a bug.
"""

from __future__ import annotations


class RootfsExportError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing sentence."""

    #: process exit status the CLI uses for this class of error
    exit_code = 1


class ConfigError(RootfsExportError):
    """A setting or command-line option has an invalid value."""

    exit_code = 2


class InvalidReference(RootfsExportError):
    """An image reference cannot be parsed."""

    exit_code = 2

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"invalid image reference {reference!r}: {reason}")


class RegistryError(RootfsExportError):
    """The registry refused, failed or answered something we cannot use."""

    def __init__(self, message: str, *, image: str | None = None, status: int | None = None,
                 url: str | None = None, transient: bool = False) -> None:
        self.image = image
        self.status = status
        self.url = url
        #: True when retrying later may succeed (5xx, 429, dropped connection)
        self.transient = transient
        super().__init__(message)


class AuthenticationError(RegistryError):
    """Credentials were missing or rejected (401/403)."""


class ManifestNotFound(RegistryError):
    """The repository, tag or digest does not exist (404)."""


class UnsupportedManifest(RegistryError):
    """A manifest type we refuse (schema1) or do not understand."""


class PlatformNotFound(RegistryError):
    """An index offers no manifest for the requested platform."""

    def __init__(self, image: str, wanted: str, available: list[str], *,
                 single: bool = False) -> None:
        self.wanted = wanted
        self.available = available
        offered = ", ".join(available) if available else "none"
        if single:
            # no index: the one manifest's config says what it is for
            message = (f"{image}: the image is for {offered}, not {wanted} "
                       "(it is a single-platform image)")
        else:
            message = f"{image}: no manifest for platform {wanted}; the index offers: {offered}"
        super().__init__(message, image=image)


class DigestMismatch(RootfsExportError):
    """Content does not hash to the digest it was announced with."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")


class LayerError(RootfsExportError):
    """A layer cannot be read or applied; names the layer digest and, where known, the path."""

    def __init__(self, message: str, *, layer: str | None = None, path: str | None = None) -> None:
        self.layer = layer
        self.path = path
        where = []
        if layer:
            where.append(f"layer {layer}")
        if path is not None:
            where.append(f"path {path!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class CorruptLayer(LayerError):
    """The layer's compression or tar stream is truncated or malformed."""


class UnsafeLayerEntry(LayerError):
    """An entry would land outside the root (``..``, symlinked parent) or is otherwise hostile."""


class LimitExceeded(LayerError):
    """A configured limit (bytes, entries, path length) was exceeded: a decompression bomb."""

    def __init__(self, what: str, value: int, maximum: int, *, setting: str,
                 layer: str | None = None, path: str | None = None) -> None:
        self.what = what
        self.value = value
        self.maximum = maximum
        self.setting = setting
        super().__init__(f"{what} {value} exceeds the limit of {maximum} "
                         f"(set {setting} to allow more if this image is legitimate)",
                         layer=layer, path=path)


class PackagingError(RootfsExportError):
    """Building the output (ext4 image, tar, directory) failed."""


class ToolMissing(PackagingError):
    """An external tool (mke2fs, e2fsck, ...) is missing or too old."""


class Canceled(RootfsExportError):
    """The job was canceled; partial output has been removed."""
