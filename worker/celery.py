"""The Celery application (``celery -A worker ...`` finds ``app`` here).

Redis is broker and result backend by default (``ROOTFS_EXPORT_BROKER_URL``,
``ROOTFS_EXPORT_RESULT_BACKEND``); JSON is the only serialisation. Every task is acknowledged
late and rejected back to the queue when its worker process dies, so a worker killed mid-task
loses no job: the message is delivered again and the (idempotent) task runs again.

Queues:

``fetch``
    resolve, relaunch and layer-download tasks; any worker may consume it.
``package.<node>``
    the chord callback that flattens and packages, on the node owning the job's output.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from worker.settings import get_settings

FETCH_QUEUE = "fetch"
TASK_RESOLVE = "rootfs_export.resolve"
TASK_FETCH = "rootfs_export.fetch_layer"
TASK_PACKAGE = "rootfs_export.package"
TASK_RELAUNCH = "rootfs_export.relaunch"

#: Redis redelivers a message whose worker vanished entirely (not just a pool process) after
#: this many seconds; the stale-job sweep usually recovers the job long before.
VISIBILITY_TIMEOUT = 3600


def package_queue(node: str) -> str:
    return f"package.{node}"


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None,
               **_kw: Any) -> dict[str, str] | None:
    """Layer and resolve tasks to ``fetch``; the package callback to its node's queue."""
    if name in (TASK_RESOLVE, TASK_FETCH, TASK_RELAUNCH):
        return {"queue": FETCH_QUEUE}
    if name == TASK_PACKAGE and isinstance(kwargs, dict) and kwargs.get("node"):
        return {"queue": package_queue(str(kwargs["node"]))}
    return None


def make_app() -> Celery:
    settings = get_settings()
    celery_app = Celery("rootfs_export", include=["worker.tasks"])
    celery_app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_default_queue=FETCH_QUEUE,
        task_routes=(route_task,),
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    )
    return celery_app


app = make_app()


@worker_process_init.connect
def _fresh_db_connections(**_kw: Any) -> None:
    # A forked pool process must not share the parent's pooled database connections.
    from api.db import dispose_engines

    dispose_engines()
