"""One settings object for the engine, the CLI, the workers and the API.

Every field can be set from the environment with the ``ROOTFS_EXPORT_`` prefix
(``ROOTFS_EXPORT_CACHE_DIR``, ...). An invalid value is a :class:`~worker.errors.ConfigError`
at start-up that names the variable and says why.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from worker.errors import ConfigError

ENV_PREFIX = "ROOTFS_EXPORT_"

GiB = 1 << 30


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rootfs-export"


class Settings(BaseSettings):
    """All tunables. Defaults suit a laptop; deployments override through the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- cache and outputs --------------------------------------------------------------
    cache_dir: Path = Field(default_factory=_default_cache_dir,
                            description="content-addressed blob cache, shareable between hosts")
    cache_max_size: int | None = Field(default=None, ge=0,
                                       description="bytes; the CLI's pull and export evict LRU "
                                       "blobs above it when they succeed")
    cache_uncompressed: bool = Field(default=True,
                                     description="keep each compressed layer's tar beside its "
                                     "blob (about 3x the disk): exports read it instead of "
                                     "inflating the blob again; --low-disk never keeps it")
    output_dir: Path = Field(default=Path("/var/lib/rootfs-export/outputs"),
                             description="where the service writes job outputs")

    # -- registry transport ----------------------------------------------------------------
    # NoDecode: a plain "a:5000,b" must reach the splitting validator, not the JSON decoder.
    insecure_registries: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                           description="hosts reached over plain HTTP")
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    retries: int = Field(default=5, ge=0, le=20)
    retry_backoff: float = Field(default=0.5, ge=0)
    max_retry_after: float = Field(default=60.0, ge=0,
                                   description="longest Retry-After we are willing to honour")
    timeout_retries: int = Field(default=1, ge=0, le=20,
                                 description="retries after a connect/read timeout or a stall")
    request_deadline: float = Field(default=60.0, gt=0,
                                    description="seconds; a manifest, config or token request "
                                    "(retries and body included) must finish within it")
    min_transfer_rate: int = Field(default=10 << 10, ge=0,
                                   description="bytes/s a blob download must average over "
                                   "stall_seconds; 0 disables the check")
    stall_seconds: float = Field(default=30.0, gt=0,
                                 description="window of the minimum transfer rate check")
    download_concurrency: int = Field(default=4, ge=1, le=64)
    allow_foreign_urls: bool = Field(default=False,
                                     description="fetch non-distributable layers from their urls")

    # -- safety limits (decompression bombs, hostile layers) ---------------------------------
    max_uncompressed_bytes: int = Field(default=64 * GiB, gt=0)
    max_entries: int = Field(default=2_000_000, gt=0)
    max_path_length: int = Field(default=4096, gt=0)
    max_manifest_bytes: int = Field(default=4 << 20, gt=0)

    # -- ext4 packaging ----------------------------------------------------------------------
    ext4_alignment: int = Field(default=2 << 20, gt=0, description="bytes; image size multiple")
    ext4_headroom: float = Field(default=0.10, ge=0, description="fraction of content size")
    ext4_min_free: int = Field(default=64 << 20, ge=0, description="bytes free at least")

    # -- service -------------------------------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    database_url: str = "sqlite:///rootfs-export.db"
    api_token: str | None = Field(default=None, repr=False)
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    stale_job_seconds: int = Field(default=300, gt=0,
                                   description="a running job silent this long is failed")

    @field_validator("insecure_registries", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        # Accept "a:5000,b" as well as a JSON list, since people export plain strings.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json
                return json.loads(value)
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("must be letters, digits, '-' or '_' (it names a Celery queue)")
        return value


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus ``overrides``; raise ConfigError if invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            var = ENV_PREFIX + field.split(".")[0].upper()
            problems.append(f"{var}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (cached)."""
    return load_settings()
