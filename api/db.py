"""The job store: SQLAlchemy 2 models and sessions, shared by the API and the Celery workers.

No FastAPI here: the workers import this module to update job rows. The schema is created only
by the Alembic migrations under ``migrations/`` (``rootfs-export db upgrade``).

Three tables:

``exports``
    one row per client request (a *job*). Its status is its own once terminal; while it is
    attached to a build, phase and progress come from the build.
``builds``
    one row per distinct artifact, keyed by manifest digest + options + node. Concurrent jobs for
    the same key attach to one build (coalescing); a succeeded build is reused by later jobs.
``build_tasks``
    one row per Celery task execution (resolve, fetch, package) with the worker that runs it and
    a heartbeat: a started task whose heartbeat stopped means its worker vanished.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

# Job and build states. A job is ``queued`` until its resolve task starts.
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)

# Task-row states.
TASK_STARTED = "started"
TASK_DONE = "done"
TASK_FAILED = "failed"
TASK_LOST = "lost"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Export(Base):
    """A client's export request (the API's *job*)."""

    __tablename__ = "exports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    image: Mapped[str] = mapped_column(String(1024))
    platform: Mapped[str | None] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(8))
    node: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    manifest_digest: Mapped[str | None] = mapped_column(String(80))
    build_id: Mapped[str | None] = mapped_column(ForeignKey("builds.id", name="fk_exports_build"),
                                                 index=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    resolve_task_id: Mapped[str | None] = mapped_column(String(64))
    resolve_attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Build(Base):
    """One artifact being (or having been) built for one or more jobs."""

    __tablename__ = "builds"
    __table_args__ = (UniqueConstraint("key", name="uq_builds_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # sha256 of manifest digest + format + node + options; "retired:<id>" once superseded
    key: Mapped[str] = mapped_column(String(72))
    image: Mapped[str] = mapped_column(String(1024))
    manifest_digest: Mapped[str] = mapped_column(String(80))
    node: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(8))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str | None] = mapped_column(String(16))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    package_task_id: Mapped[str | None] = mapped_column(String(64))
    task_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class BuildTask(Base):
    """One Celery task execution, with the worker running it and its heartbeat."""

    __tablename__ = "build_tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)   # Celery task id
    kind: Mapped[str] = mapped_column(String(16))                    # resolve | fetch | package
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    build_id: Mapped[str | None] = mapped_column(String(32), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    layer: Mapped[int | None] = mapped_column(Integer)
    digest: Mapped[str | None] = mapped_column(String(80))
    worker: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


def make_engine(url: str, *, readonly: bool = False) -> Engine:
    """An engine for ``url`` tuned for many short transactions from several processes.

    On SQLite, ``readonly`` engines begin deferred transactions (WAL readers never wait for the
    writer); the others take the write lock up front.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy emit BEGIN itself (below); WAL lets readers run beside a writer.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: a deferred transaction upgrading to a
            # writer under contention fails at once instead of waiting for the busy timeout.
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


_lock = threading.Lock()
_engines: dict[tuple[str, bool], tuple[Engine, sessionmaker[Session]]] = {}


def get_sessionmaker(url: str, *, readonly: bool = False) -> sessionmaker[Session]:
    """The process-wide session factory for ``url`` (one engine per URL, mode and process)."""
    if not url.startswith("sqlite"):
        readonly = False        # one pool serves both on servers with row locks
    with _lock:
        if (url, readonly) not in _engines:
            engine = make_engine(url, readonly=readonly)
            _engines[(url, readonly)] = (engine, sessionmaker(engine, expire_on_commit=False))
        return _engines[(url, readonly)][1]


def dispose_engines() -> None:
    """Forget pooled connections (after fork, and in tests)."""
    with _lock:
        for engine, _ in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str, *, readonly: bool = False) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error.

    ``readonly`` sessions must not write (on SQLite they do not hold the write lock).
    """
    session = get_sessionmaker(url, readonly=readonly)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()
