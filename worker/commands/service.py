"""``rootfs-export worker``, ``serve`` and ``db upgrade``: the service's processes."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from worker.errors import ConfigError
from worker.settings import ENV_PREFIX, load_settings

if TYPE_CHECKING:
    from alembic.config import Config

_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NODE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
ALEMBIC_INI = MIGRATIONS_DIR.parent / "alembic.ini"


def worker_argv(*, node: str, queues: str | None, concurrency: int | None,
                loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments for a node: default queues ``fetch`` + ``package.NODE``."""
    from worker.celery import FETCH_QUEUE, package_queue

    names = [q.strip() for q in (queues or "").split(",") if q.strip()] \
        or [FETCH_QUEUE, package_queue(node)]
    for q in names:
        if not _QUEUE_RE.match(q):
            raise ConfigError(f"--queues: {q!r} is not a queue name")
    argv = ["worker", "-Q", ",".join(names), "-n", f"{node}@%h", "-E",
            f"--loglevel={loglevel}"]
    if concurrency is not None:
        if concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        argv.append(f"--concurrency={concurrency}")
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    """Start a Celery worker in this process (``celery -A worker worker`` with our queues)."""
    if args.node:
        if not _NODE_RE.match(args.node):
            raise ConfigError(f"--node {args.node!r}: must be letters, digits, '-' or '_' "
                              "(it names the Celery queue package.NODE)")
        # Before the Celery app (and the settings it caches) is imported: tasks read the node
        # from the settings to name and place their outputs.
        os.environ[ENV_PREFIX + "NODE"] = args.node
    settings = load_settings()
    argv = worker_argv(node=settings.node, queues=args.queues, concurrency=args.concurrency,
                       loglevel="DEBUG" if getattr(args, "verbose", False) else "INFO")
    from worker.celery import app

    app.worker_main(argv=argv)
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the REST API with uvicorn; a non-loopback address needs an API token."""
    settings = load_settings()
    if not is_loopback(args.host) and not settings.api_token:
        raise ConfigError(f"refusing to listen on {args.host} without an API token: set "
                          f"{ENV_PREFIX}API_TOKEN (clients send 'Authorization: Bearer TOKEN') "
                          "or listen on 127.0.0.1")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port")
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info",
                proxy_headers=False)
    return 0


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal '%' in a URL (encoded password) must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations to ``database_url``."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = load_settings()
    upgrade_database(settings.database_url)
    print("database schema is up to date")
    return 0
