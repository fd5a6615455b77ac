"""The REST API: submit, watch, list and cancel exports; health of the database and broker.

``rootfs-export serve`` runs it with uvicorn. When ``ROOTFS_EXPORT_API_TOKEN`` is set every
route but ``/healthz`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text

from api import jobs, store
from api.db import STATUSES, Export, session_scope
from api.schemas import ExportCreate, ExportJob, ExportList, Health
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _sweep_interval(settings: Settings) -> float:
    return max(1.0, min(30.0, settings.stale_job_seconds / 3))


def _sweeper(settings: Settings, stop: threading.Event) -> None:
    """Periodically recover jobs whose worker vanished (no Celery beat needed)."""
    while not stop.wait(_sweep_interval(settings)):
        try:
            jobs.sweep(settings)
        except Exception:
            log.warning("stale-job sweep failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=_sweeper, args=(settings, stop), name="sweeper",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    app = FastAPI(title="rootfs-export", version="1", lifespan=lifespan,
                  description="Export container images as ext4 root filesystems for microVMs.")
    app.state.settings = settings

    def require_token(request: Request) -> None:
        token = settings.api_token
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                  token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                                "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]
    url = settings.database_url

    @app.post("/v1/exports", status_code=status.HTTP_202_ACCEPTED, response_model=ExportJob,
              dependencies=auth)
    def create_export(body: ExportCreate, response: Response) -> dict[str, Any]:
        try:
            view = jobs.submit(settings, image=body.image, platform=body.platform,
                               fmt=body.format, node=body.node, options=body.options())
        except jobs.BrokerUnavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"the job could not be queued: {exc}") from None
        response.headers["Location"] = f"/v1/exports/{view['id']}"
        return view

    @app.get("/v1/exports/{job_id}", response_model=ExportJob, dependencies=auth)
    def get_export(job_id: str) -> dict[str, Any]:
        view = store.get_job(url, job_id)
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no export job {job_id!r}")
        return view

    @app.get("/v1/exports", response_model=ExportList, dependencies=auth)
    def list_exports(
        status_: Annotated[str | None, Query(alias="status",
                                             description="|".join(STATUSES))] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        if status_ is not None and status_ not in STATUSES:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                                f"status must be one of {', '.join(STATUSES)}, not {status_!r}")
        total, items = store.list_jobs(url, status=status_, limit=limit, offset=offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @app.delete("/v1/exports/{job_id}", response_model=ExportJob, dependencies=auth)
    def cancel_export(job_id: str) -> dict[str, Any]:
        outcome = jobs.cancel(settings, job_id)
        if not outcome.found:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no export job {job_id!r}")
        if outcome.already:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"export job {job_id} already {outcome.already}")
        view = store.get_job(url, job_id)
        assert view is not None
        return view

    @app.get("/healthz", response_model=Health)
    def healthz() -> JSONResponse:
        database = broker = "ok"
        try:
            with session_scope(url, readonly=True) as s:
                s.execute(text("SELECT 1"))
                s.execute(select(func.count()).select_from(Export))
        except Exception as exc:
            database = f"error: {_one_line(exc)} (is the schema created? rootfs-export db upgrade)"
        try:
            check_broker()
        except Exception as exc:
            broker = f"error: {_one_line(exc)}"
        ok = database == "ok" and broker == "ok"
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "database": database, "broker": broker},
            status_code=200 if ok else 503)

    return app


def check_broker(timeout: float = 3.0) -> None:
    """Connect to the broker once; raise if it does not answer within ``timeout``."""
    from worker.celery import app as celery_app

    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                               timeout=timeout)


def _one_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app` builds the app on first use, with settings from the environment.
    if name == "app":
        return create_app()
    raise AttributeError(name)
