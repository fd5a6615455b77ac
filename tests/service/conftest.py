"""Fixtures for the service tests: fresh SQLite and PostgreSQL databases, process stacks."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.stack import REPO, Stack

PG_SOCKET = "/var/run/postgresql"


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"dbname=test host={PG_SOCKET}", autocommit=True,
                         connect_timeout=10) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def postgres_ready() -> None:
    """PostgreSQL answering on its socket with the ``test`` database (scripts/ensure-postgres)."""
    out = subprocess.run([str(REPO / "scripts" / "ensure-postgres")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"scripts/ensure-postgres failed:\n{out.stdout}{out.stderr}"


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create a database with a random name; drop it (and its connections) afterwards."""
    name = f"rfx_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg:///{name}?host={PG_SOCKET}"
    finally:
        from api.db import dispose_engines

        dispose_engines()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_ready: None) -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_module_url(postgres_ready: None) -> Iterator[str]:
    """A fresh PostgreSQL database shared by one test module."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def migrated_db(db_url: str) -> Iterator[str]:
    from api.db import dispose_engines
    from worker.commands.service import upgrade_database

    upgrade_database(db_url)
    yield db_url
    dispose_engines()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An API client of the test module's ``stack`` (a fixture each such module defines)."""
    with stack.client() as c:
        yield c
