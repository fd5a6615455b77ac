"""Registry credentials: explicit flags, Docker's config.json, and credential helpers.

Lookup order for a registry host (as Docker does): ``credHelpers[host]``, then ``credsStore``,
then ``auths[host]``. Secrets never appear in ``repr``/``str``, logs or exception messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from worker.errors import AuthenticationError, ConfigError

log = logging.getLogger(__name__)

#: the key Docker uses for Docker Hub in config.json and with credential helpers
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
HELPER_TIMEOUT = 30.0


class Credentials:
    """A user name with a password, or an identity (refresh) token. Never shows the secret."""

    __slots__ = ("username", "_password", "_identity_token")

    def __init__(self, username: str = "", password: str = "", *,
                 identity_token: str = "") -> None:
        self.username = username
        self._password = password
        self._identity_token = identity_token

    @property
    def password(self) -> str:
        return self._password

    @property
    def identity_token(self) -> str:
        return self._identity_token

    @property
    def basic(self) -> tuple[str, str] | None:
        """(user, password) for HTTP Basic, if this is a password credential."""
        if self._password and not self._identity_token:
            return (self.username, self._password)
        return None

    def __repr__(self) -> str:
        kind = "identity_token" if self._identity_token else "password"
        return f"Credentials(username={self.username!r}, {kind}=***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and \
            (self.username, self._password, self._identity_token) == \
            (other.username, other._password, other._identity_token)

    def __hash__(self) -> int:
        return hash((self.username, self._password, self._identity_token))

    def __reduce__(self) -> Any:
        # Credentials must not travel through pickles (Celery task arguments, results).
        raise TypeError("Credentials cannot be pickled")


def docker_config_dir() -> Path:
    """``$DOCKER_CONFIG`` or ``~/.docker``."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path(os.path.expanduser("~")) / ".docker"


def _normalise_key(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Docker Hub aliases -> ``docker.io``."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in _HUB_NAMES else k


def _server_url(registry: str) -> str:
    """What to ask a credential helper for (Docker passes Hub as its v1 URL)."""
    return DOCKER_HUB_KEY if _normalise_key(registry) == "docker.io" else registry


def _load_config(config_dir: Path) -> dict[str, Any]:
    path = config_dir / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    return cfg if isinstance(cfg, dict) else {}


def _from_auths_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken") or ""
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth + "=" * (-len(auth) % 4)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            # Say which entry is broken, never what it contains.
            raise ConfigError("docker config: an 'auth' value is not valid base64 of "
                              "'user:password'") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ConfigError("docker config: an 'auth' value is not of the form "
                              "base64('user:password')")
    if token:
        return Credentials(username, identity_token=token)
    if username or password:
        return Credentials(username, password)
    return None


def run_helper(helper: str, registry: str, *, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` for ``registry``; None if it has nothing."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        log.warning("credential helper docker-credential-%s is not on PATH; "
                    "continuing without credentials for %s", helper, registry)
        return None
    try:
        proc = subprocess.run([exe, "get"], input=_server_url(registry).encode(),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AuthenticationError(f"credential helper docker-credential-{helper} did not answer "
                                  f"within {timeout:.0f}s for {registry}") from None
    if proc.returncode != 0:
        msg = proc.stdout.decode("utf-8", "replace").strip()
        if "credentials not found" in msg.lower() or not msg:
            return None
        # Helpers print a short reason on failure; keep it short and never echo stdin.
        raise AuthenticationError(f"credential helper docker-credential-{helper} failed for "
                                  f"{registry}: {msg[:200]}")
    try:
        out = json.loads(proc.stdout)
        username = out.get("Username") or ""
        secret = out.get("Secret") or ""
    except (ValueError, AttributeError):
        raise AuthenticationError(f"credential helper docker-credential-{helper} returned "
                                  "unreadable output") from None
    if not secret:
        return None
    if username == "<token>":
        return Credentials("", identity_token=secret)
    return Credentials(username, secret)


def find_credentials(registry: str, *, config_dir: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (a host[:port] or docker.io) from Docker's config, or None."""
    cfg = _load_config(config_dir or docker_config_dir())
    want = _normalise_key(registry)
    helpers = cfg.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _normalise_key(key) == want and isinstance(helper, str) and helper:
                return run_helper(helper, registry)
    auths = cfg.get("auths") or {}
    entry = None
    if isinstance(auths, dict):
        for key, value in auths.items():
            if _normalise_key(key) == want:
                entry = value
                break
    store = cfg.get("credsStore")
    if isinstance(store, str) and store:
        found = run_helper(store, registry)
        if found is not None:
            return found
    return _from_auths_entry(entry)


class CredentialSource:
    """Explicit credentials for one registry (CLI flags), else Docker's config per registry."""

    def __init__(self, explicit: Credentials | None = None, *, registry: str | None = None,
                 config_dir: Path | None = None, use_docker_config: bool = True) -> None:
        self.explicit = explicit
        self.registry = _normalise_key(registry) if registry else None
        self.config_dir = config_dir
        self.use_docker_config = use_docker_config
        self._cache: dict[str, Credentials | None] = {}

    def get(self, registry: str) -> Credentials | None:
        key = _normalise_key(registry)
        if self.explicit is not None and (self.registry is None or self.registry == key):
            return self.explicit
        if not self.use_docker_config:
            return None
        if key not in self._cache:
            self._cache[key] = find_credentials(registry, config_dir=self.config_dir)
        return self._cache[key]

    def __repr__(self) -> str:
        return f"CredentialSource(explicit={self.explicit!r}, registry={self.registry!r})"
