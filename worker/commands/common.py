"""Helpers shared by command handlers: options -> settings, credentials, sizes."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from worker.errors import ConfigError
from worker.pull.credentials import Credentials, CredentialSource
from worker.pull.reference import parse_reference
from worker.settings import Settings, load_settings

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, *, option: str = "size") -> int:
    """``10G``, ``512M``, ``1.5GiB``, ``4096`` -> bytes (binary units); ConfigError if invalid."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"{option}: invalid size {text!r} (examples: 4096, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment overridden by the command-line options present in ``args``.

    Understands ``--cache-dir``, ``--insecure-registry`` (added to the environment's list) and
    ``--concurrency``; ``extra`` adds more overrides.
    """
    overrides: dict[str, Any] = {}
    base = load_settings()
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir:
        overrides["cache_dir"] = cache_dir
    insecure = getattr(args, "insecure_registry", None) or []
    if insecure:
        overrides["insecure_registries"] = list(base.insecure_registries) + list(insecure)
    concurrency = getattr(args, "concurrency", None)
    if concurrency is not None:
        overrides["download_concurrency"] = concurrency
    overrides.update(extra)
    if not overrides:
        return base
    return load_settings(**overrides)


def credentials_from_args(args: argparse.Namespace, *,
                          stdin: Any = None) -> CredentialSource | None:
    """Credentials for the image's registry from ``--username`` + ``--password-stdin``.

    Returns None when no flag was given (the engine then uses Docker's config.json and
    credential helpers). The password is read from standard input once, trailing newline
    stripped, and never echoed.
    """
    username = getattr(args, "username", None)
    password_stdin = bool(getattr(args, "password_stdin", False))
    if not username and not password_stdin:
        return None
    if password_stdin and not username:
        raise ConfigError("--password-stdin needs --username")
    if username and not password_stdin:
        raise ConfigError("--username needs --password-stdin (the password is read from "
                          "standard input, never from the command line)")
    stream = stdin if stdin is not None else sys.stdin
    password = stream.read()
    password = password.rstrip("\r\n")
    if not password:
        raise ConfigError("--password-stdin: standard input was empty")
    image = getattr(args, "image", None)
    registry = parse_reference(image).registry if image else None
    return CredentialSource(Credentials(str(username), password), registry=registry)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
