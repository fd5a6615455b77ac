"""Request and response bodies of the REST API, with the validation that makes bad input a 422.

Image references and platforms are checked with the engine's own parsers, so the API rejects
exactly what the CLI would. Clients cannot name output paths: the request has no such field
(unknown fields are refused), and outputs get names derived from the job's build.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.errors import RootfsExportError

MiB = 1 << 20
#: smallest ext4 image we accept: mke2fs needs room for its metadata and a root directory
MIN_EXT4_SIZE = 8 * MiB
#: largest: a sanity bound against typos (16 TiB)
MAX_EXT4_SIZE = 16 << 40
#: largest headroom fraction (10 = eleven times the content)
MAX_HEADROOM_FRACTION = 10.0

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_NODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9._+-]{0,16}$")

Format = Literal["ext4", "tar", "dir"]
Ext4MethodName = Literal["auto", "direct", "stream", "mount", "dir"]
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]


def parse_size(text: str | int) -> int:
    """``2G``, ``512M``, ``1.5GiB``, ``1048576`` -> bytes (binary units); ValueError if bad."""
    if isinstance(text, bool):
        raise ValueError("must be a size such as 2G, 512M or a number of bytes")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a size (examples: 2G, 512M, 1073741824)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0:
        raise ValueError("must not be negative")
    return value


class ExportCreate(BaseModel):
    """``POST /v1/exports``."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=1024,
                       description="image reference, e.g. registry:5000/team/app:1.2 or @sha256:")
    platform: str | None = Field(default=None, max_length=64,
                                 description="os/arch[/variant]; default: the worker's platform")
    format: Format = "ext4"
    node: str | None = Field(default=None,
                             description="node that packages and keeps the output "
                                         "(default: the API's ROOTFS_EXPORT_NODE)")
    size: int | str | None = Field(default=None, description="ext4 image size, e.g. 2G")
    headroom: float | str | None = Field(
        default=None, description="free space to add: a fraction (0.1) or a size (256M)")
    ext4_method: Ext4MethodName = "auto"
    label: str = Field(default="rootfs", description="ext4 filesystem label (16 bytes at most)")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        from worker.pull.reference import parse_reference

        try:
            parse_reference(value)
        except RootfsExportError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("platform")
    @classmethod
    def _platform(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from worker.pull.manifest import Platform

        try:
            return str(Platform.parse(value))
        except RootfsExportError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("node")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        if value is not None and not _NODE_RE.match(value):
            raise ValueError("must be 1-64 letters, digits, '-' or '_' (it names a Celery queue)")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        size = parse_size(value)
        if not MIN_EXT4_SIZE <= size <= MAX_EXT4_SIZE:
            raise ValueError(f"{size} bytes is outside the accepted range "
                             f"{MIN_EXT4_SIZE} (8M) .. {MAX_EXT4_SIZE} (16T)")
        return size

    @field_validator("headroom")
    @classmethod
    def _headroom(cls, value: float | str | None) -> float | str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("must be a fraction (0.1) or a size (256M)")
        if isinstance(value, int | float):
            if not 0 <= value <= MAX_HEADROOM_FRACTION:
                raise ValueError(f"a fraction must be between 0 and {MAX_HEADROOM_FRACTION}")
            return float(value)
        try:
            fraction = float(value)
        except ValueError:
            parse_size(value)       # raises a ValueError naming the bad text
            return value
        if not 0 <= fraction <= MAX_HEADROOM_FRACTION:
            raise ValueError(f"a fraction must be between 0 and {MAX_HEADROOM_FRACTION}")
        return fraction

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if len(value.encode()) > 16 or not _LABEL_RE.match(value):
            raise ValueError("an ext4 label is at most 16 characters of letters, digits, "
                             "'.', '_', '+' or '-'")
        return value

    @model_validator(mode="after")
    def _ext4_only(self) -> ExportCreate:
        if self.format != "ext4":
            for name in ("size", "headroom"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to the ext4 format only "
                                     f"(this request asks for {self.format})")
            if self.ext4_method != "auto":
                raise ValueError("ext4_method applies to the ext4 format only")
        return self

    def options(self) -> dict[str, Any]:
        """The build options stored with the job (part of the coalescing key)."""
        headroom: float | None = None
        min_free: int | None = None
        if isinstance(self.headroom, str):
            headroom, min_free = 0.0, parse_size(self.headroom)
        elif self.headroom is not None:
            headroom = float(self.headroom)
        if self.format != "ext4":
            return {}
        return {"size": self.size, "headroom": headroom, "min_free": min_free,
                "ext4_method": self.ext4_method, "label": self.label}


class ExportJob(BaseModel):
    """A job as the API shows it."""

    id: str
    image: str
    platform: str | None
    format: str
    node: str
    options: dict[str, Any]
    status: Status
    phase: str | None
    progress: dict[str, Any] | None = Field(
        description="the shared progress event: phase, bytes and layers done/total, per layer")
    result: dict[str, Any] | None = Field(
        description="output path (on the node), size, sha256, image config, ...")
    error: str | None
    manifest_digest: str | None
    build_id: str | None
    reused: bool = Field(description="attached to another job's build or its finished artifact")
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None = Field(
        default=None, description="last sign of life of a worker running this job's tasks")


class ExportList(BaseModel):
    items: list[ExportJob]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    database: str
    broker: str
