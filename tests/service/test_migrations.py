"""The schema exists only through Alembic migrations, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import subprocess

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.db import Base
from tests.service.stack import CLI


def test_db_upgrade_command_creates_the_schema(db_url: str, tmp_path) -> None:
    env = {"ROOTFS_EXPORT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    for _ in range(2):     # idempotent: a second upgrade is a no-op
        out = subprocess.run([CLI, "db", "upgrade"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "up to date" in out.stdout
    engine = sa.create_engine(db_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert {"exports", "builds", "build_tasks", "alembic_version"} <= names
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")
                                ).scalar_one() == "0001"
    finally:
        engine.dispose()


def test_models_match_the_migrations(migrated_db: str) -> None:
    """The ORM models and the migrated schema agree (no autogenerate diff)."""
    engine = sa.create_engine(migrated_db)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def test_no_table_without_migration(db_url: str) -> None:
    """Nothing else creates tables: a fresh database stays empty until `db upgrade`."""
    from api import store
    from api.db import dispose_engines

    try:
        store.get_job(db_url, "0" * 32)
    except sa.exc.OperationalError as exc:
        assert "exports" in str(exc)
    except sa.exc.ProgrammingError as exc:
        assert "exports" in str(exc)
    else:
        raise AssertionError("reading a job from an unmigrated database succeeded")
    finally:
        dispose_engines()
