"""Shared fixtures: real registries, a private redis, settings in tmp dirs, the Debian image.

Tools the suite needs are checked once; a missing one fails every test with the install hint
(a missing tool must never turn into a green run of skips).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis import RedisProcess
from tests.support.registry import RegistryProcess
from tests.support.root import require_root

REQUIRED_TOOLS = {
    "docker-registry": "apt install docker-registry",
    "redis-server": "apt install redis-server",
    "mke2fs": "apt install -t bookworm-backports e2fsprogs",
    "debootstrap": "apt install debootstrap",
    "htpasswd": "apt install apache2-utils",
}
_missing_tools: list[str] = []


def _tool_path(name: str) -> str | None:
    # mke2fs and debootstrap live in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def pytest_sessionstart(session: pytest.Session) -> None:
    _missing_tools[:] = [t for t in REQUIRED_TOOLS if _tool_path(t) is None]


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _missing_tools:
        return [f"MISSING TOOLS (every test will fail): {', '.join(_missing_tools)}"]
    return []


@pytest.fixture(scope="session", autouse=True)
def _indexers_agree_on_every_built_tar() -> Iterator[None]:
    """Every tar a test builds is indexed by the direct parser and the tarfile reference too;
    a difference fails the test that built it (tests/pull/test_index_differential.py)."""
    from tests.support import imagebuilder
    from tests.support.tarfile_index import assert_same_index

    seen: set[bytes] = set()

    def check(tar: bytes) -> None:
        key = hashlib.sha256(tar).digest()
        if key not in seen:
            seen.add(key)
            assert_same_index(tar, chunk_size=777 if len(tar) < 1 << 20 else 1 << 16)

    imagebuilder.TAR_HOOKS.append(check)
    yield
    imagebuilder.TAR_HOOKS.remove(check)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Root-only checks (switching users, device nodes, ownership) fail loudly when not root,
    # like a missing tool: a green run must never hide them as skips.
    marker = item.get_closest_marker("needs_root")
    if marker is not None:
        require_root(marker.kwargs.get("reason") or (marker.args[0] if marker.args else "root only"))
    if _missing_tools:
        hints = "; ".join(f"{t}: {REQUIRED_TOOLS[t]}" for t in _missing_tools)
        pytest.fail(
            f"required tools missing from this machine: {hints} "
            "(or run ./scripts/install-system-deps)",
            pytrace=False,
        )


# -- isolation from the developer's environment ---------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[None]:
    """No ROOTFS_EXPORT_* settings or docker credentials from the real environment leak in."""
    for name in list(os.environ):
        if name.startswith("ROOTFS_EXPORT_") and not name.startswith("ROOTFS_EXPORT_TEST"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker-config")))
    _clear_settings_cache()
    yield
    _clear_settings_cache()


def _clear_settings_cache() -> None:
    try:
        from worker.settings import get_settings
    except Exception:  # the engine may be mid-refactor; infra must not depend on it
        return
    get_settings.cache_clear()


# -- processes --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryProcess]:
    """A docker-registry without auth on 127.0.0.1:PORT (deletes enabled)."""
    with RegistryProcess() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry() -> Iterator[RegistryProcess]:
    """A docker-registry with htpasswd basic auth: user "tester", random ``.password``."""
    with RegistryProcess(auth=True, username="tester") as reg:
        yield reg


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A private redis-server (never the machine's 6379); ``.url`` is redis://127.0.0.1:P."""
    with RedisProcess() as server:
        yield server


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., RegistryProcess]]:
    """``registry_factory(auth=False)`` -> a fresh, empty registry just for this test."""
    started: list[RegistryProcess] = []

    def make(**kwargs: Any) -> RegistryProcess:
        reg = RegistryProcess(**kwargs).start()
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses (the session registries are shared)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60] or "test"
    return f"t/{name}-{uuid.uuid4().hex[:8]}"


# -- settings ---------------------------------------------------------------------------------
@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Any]:
    """``settings_factory(**overrides)`` -> Settings with cache/output dirs under tmp_path."""

    def make(**overrides: Any) -> Any:
        from worker.settings import load_settings

        overrides.setdefault("cache_dir", tmp_path / "cache")
        overrides.setdefault("output_dir", tmp_path / "out")
        return load_settings(**overrides)

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Any:
    """Default settings with cache_dir=tmp_path/"cache" and output_dir=tmp_path/"out"."""
    return settings_factory()


# -- the real Debian image ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def debian_image(registry: RegistryProcess) -> Any:
    """The real debootstrap Debian bookworm image (3 layers), pushed to ``registry``.

    Built once per machine (minutes) and cached; see tests/support/debian.py. Returns a
    DebianImage with ``.reference``, ``.listing_path``, ``.listing``, ``.layers``.
    """
    from tests.support.debian import push_debian_image

    return push_debian_image(registry, repo="debian", tag="bookworm")


@pytest.fixture(scope="session")
def auth_debian_image(auth_registry: RegistryProcess) -> Any:
    """The same Debian image, pushed to ``auth_registry`` (basic auth) as debian:bookworm."""
    from tests.support.debian import push_debian_image

    return push_debian_image(auth_registry, repo="debian", tag="bookworm")
